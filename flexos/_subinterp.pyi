"""Thread-switching gates between subinterpreters (flexos/_subinterp.c; CPython 3.13+).

Built before 3.13 as a stub with only ``AVAILABLE = 0``. All ids are ints. The main interpreter
is the app, every other a compartment: what only the app may do raises PermissionError elsewhere.
"""

from collections.abc import Callable

from typing_extensions import Buffer

AVAILABLE: int
"""1 where the gates are built (CPython 3.13+), 0 in the stub that says the driver is unavailable."""

def create() -> int:
    """(The app) a new interpreter with its own GIL and allocator, marked as running its program
    (so the stdlib's ``_interpreters`` will not exec in it); its id."""

def run(interp_id: int, source: str, /) -> int | str | None:
    """(The app) execute ``source`` in that interpreter; the int or str it left in ``result``, else None."""

def register(dispatch: Callable[[bytes], bytes], caller: int = ..., /) -> int:
    """Serve ``dispatch`` in the current interpreter; the endpoint id its one caller calls.

    In the app, ``caller`` is the compartment that may call it; a compartment passes none (the app
    calls it) and may register only one endpoint.
    """

def adopt(endpoint_id: int, interp_id: int, max_reply: int, /) -> None:
    """(The app) check that compartment ``interp_id`` registered that endpoint, and refuse its
    replies over ``max_reply`` bytes (-1: no bound) with ReplyTooLarge. LookupError otherwise."""

def unregister(endpoint_id: int, /) -> None:
    """Close an endpoint of the current interpreter (a later call raises PeerGone)."""

def call(endpoint_id: int, frame: bytes, deadline: float | None = None, /) -> bytes:
    """Switch this thread into the endpoint's interpreter, dispatch ``frame``, return the reply.

    ``deadline`` means nothing here (the callee runs on the caller's thread). Raises PeerGone once
    the endpoint is closed, ProtocolError when its dispatcher fails, ReplyTooLarge past its
    adopted bound, PermissionError when this interpreter is not the endpoint's caller.
    """

def destroy(interp_id: int, /) -> None:
    """(The app) end an interpreter (no call may be running in it); unpin what was lent to it."""

def lend(buffer: Buffer, endpoint_id: int, /) -> tuple[int, int, int]:
    """(The app) pin a read-only buffer for the compartment behind that endpoint: (loan id, address, length)."""

def borrow(loan_id: int, address: int, length: int, /) -> memoryview:
    """In the compartment it was lent to: a read-only, zero-copy view of exactly that live loan,
    once (ValueError otherwise)."""

def pending_loans() -> int:
    """How many buffers this interpreter has lent and not got back."""
