"""A transport between two interpreters of one process: the calling thread switches over.

``exchange`` enters the peer interpreter on the caller's own OS thread (``flexos._subinterp``:
release our GIL, take the peer's, dispatch, switch back), so there is no thread hop and nothing
to poll. Nested calls back are recursion on the same thread, as with the loopback transport.
The app can lend large buffers to the compartment instead of copying them (:meth:`lend` /
:meth:`borrow`); never the other way round, since a lender can change what it lent after the
borrower checked it. Who may call, run and lend what is enforced by ``flexos._subinterp`` itself.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import ClassVar

from flexos import _subinterp
from flexos.errors import ProtocolError

# loan id, address, length
_LOAN = struct.Struct("<qQq")


class InterpreterChannel:
    def __init__(self, endpoint: int) -> None:
        # ``exchange(frame, deadline)`` is the C gate itself (no Python frame on the hot path). It
        # raises PeerGone once the peer is ended, ProtocolError if its dispatcher fails and
        # ReplyTooLarge past the bound the app adopted the endpoint with; a deadline means
        # nothing: the callee runs on our own thread.
        self.exchange = functools.partial(_subinterp.call, endpoint)

    def close(self) -> None:
        pass


class InterpreterTransport:
    """One stateless, re-entrant channel into the interpreter that registered ``endpoint``."""

    inline: ClassVar[bool] = True  # the peer runs on the caller's thread

    #: Buffers at least this large are lent, not copied (below it a copy is cheaper than a loan).
    LEND_THRESHOLD = 1 << 16

    def __init__(self, endpoint: int, death: Callable[[], BaseException]) -> None:
        self._endpoint = endpoint
        self._channel = InterpreterChannel(endpoint)
        self._death = death

    def open_channel(self) -> InterpreterChannel:
        return self._channel

    def death(self) -> BaseException:
        return self._death()

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass

    # -- zero-copy buffers ----------------------------------------------------------------------
    def lend(self, buffer: bytes | bytearray | memoryview) -> bytes:
        """(The app) pin ``buffer`` for this compartment and describe it; it maps it without a copy."""
        return _LOAN.pack(*_subinterp.lend(buffer, self._endpoint))

    @staticmethod
    def borrow(payload: bytes) -> memoryview:
        """(A compartment) a read-only view of a buffer the app lent it (only a live loan lent to
        this interpreter, exactly its bytes); in the app every loan is refused."""
        if len(payload) != _LOAN.size:
            raise ProtocolError("malformed buffer loan")
        try:
            return _subinterp.borrow(*_LOAN.unpack(payload))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
