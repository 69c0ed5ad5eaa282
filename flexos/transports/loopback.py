"""An in-process transport: the peer's dispatcher runs on the caller's own stack.

Used by ``fcalls`` in strict mode, where every call still goes through the full encode/decode
path so that whatever would break under real isolation breaks here first. Nested calls (the
callee calling back) are plain recursion, so ``exchange`` always returns the final reply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from flexos.errors import FlexosError


class LoopbackChannel:
    """``exchange`` is the peer's dispatch itself (no Python frame in between). Its second
    argument is dispatch's ``deferred``, so a caller passes none: the callee runs on our stack,
    there is no deadline to give (Link.call passes None, as every inline channel gets)."""

    __slots__ = ("exchange",)
    exchange: Callable[..., bytes]

    def __init__(self, dispatch: Callable[..., bytes]) -> None:
        self.exchange = dispatch

    def close(self) -> None:
        pass


class LoopbackTransport:
    """Hands out one stateless, re-entrant channel that dispatches into ``peer``."""

    inline: ClassVar[bool] = True  # the peer runs on the caller's stack

    def __init__(self, dispatch: Callable[..., bytes]) -> None:
        self._channel = LoopbackChannel(dispatch)

    def open_channel(self) -> LoopbackChannel:
        return self._channel

    def death(self) -> BaseException:
        return FlexosError("loopback peer closed")

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
