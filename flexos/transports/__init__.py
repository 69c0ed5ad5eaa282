"""Transports carry frames between two compartments; they know nothing of what a frame means.

A channel is a strictly alternating conversation used by one thread at a time: ``exchange``
sends a frame and returns the peer's next frame (a reply, or a nested call the peer makes while
serving ours). A transport hands out channels to one peer and says what to raise when the peer
is gone.
"""

from __future__ import annotations

from typing import Protocol

from flexos.errors import FlexosError


class PeerGone(FlexosError):
    """The peer process died; the link turns this into CompartmentCrashed."""


class CallTimeout(FlexosError):
    """The peer did not answer within the compartment's ``timeout``."""


class ChannelClosed(FlexosError):
    """The peer, still alive, dropped this one channel (e.g. its serving thread failed)."""


class Channel(Protocol):
    def exchange(self, frame: bytes, timeout: float | None = None) -> bytes: ...
    def recv(self, timeout: float | None = None) -> bytes: ...
    def close(self) -> None: ...


class Transport(Protocol):
    def open_channel(self) -> Channel: ...
    def death(self) -> BaseException: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...
