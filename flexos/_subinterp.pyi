"""Thread-switching gates between subinterpreters (flexos/_subinterp.c; CPython 3.13+).

Built before 3.13 as a stub with only ``AVAILABLE = 0``. All ids are ints.
"""

from collections.abc import Callable

from typing_extensions import Buffer

AVAILABLE: int
"""1 where the gates are built (CPython 3.13+), 0 in the stub that says the driver is unavailable."""

def create() -> int:
    """A new interpreter with its own GIL and allocator; its id."""

def run(interp_id: int, source: str, /) -> int | str | None:
    """Execute ``source`` in that interpreter; the int or str it left in ``result``, else None."""

def register(dispatch: Callable[[bytes], bytes], /) -> int:
    """Serve ``dispatch`` in the current interpreter; the endpoint id other interpreters call."""

def unregister(endpoint_id: int, /) -> None:
    """Close an endpoint of the current interpreter (a later call raises PeerGone)."""

def call(endpoint_id: int, frame: bytes, timeout: float | None = None, /) -> bytes:
    """Switch this thread into the endpoint's interpreter, dispatch ``frame``, return the reply.

    ``timeout`` means nothing here (the callee runs on the caller's thread). Raises PeerGone once
    the endpoint is closed, ProtocolError when its dispatcher fails.
    """

def destroy(interp_id: int, /) -> None:
    """End an interpreter (no call may be running in it)."""

def lend(buffer: Buffer, /) -> tuple[int, int, int]:
    """Pin a read-only buffer for another interpreter: (loan id, address, length)."""

def borrow(loan_id: int, address: int, length: int, /) -> memoryview:
    """In the borrower: a read-only, zero-copy view of exactly that live loan (ValueError otherwise)."""

def pending_loans() -> int:
    """How many buffers this interpreter has lent and not got back."""
