"""Transports carry frames between two compartments; they know nothing of what a frame means.

A channel is a strictly alternating conversation used by one thread at a time: ``exchange``
sends a frame and returns the peer's next frame (a reply, or a nested call the peer makes while
serving ours), by a ``deadline`` (a ``time.monotonic()`` instant, or None) that holds for the
whole frame, every fragment of it included. A transport hands out channels to one peer and says
what to raise when the peer is gone. Two families:

- inline (``inline = True``: loopback, interp): the peer runs on the caller's own thread, so one
  re-entrant channel serves every thread and nested calls are recursion;
- served (:class:`ServedTransport`: shm, ivshmem): the peer is another process; either side opens
  channels, and the other side's accept loop serves each on a thread of its own (``send`` /
  ``recv``). Control messages travel beside the channels (:mod:`flexos.wire.control`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

from flexos.errors import FlexosError, ProtocolError


class PeerGone(FlexosError):
    """The peer process died; the link turns this into CompartmentCrashed."""


class CallTimeout(FlexosError):
    """The peer did not finish answering by the call's deadline (the compartment's ``timeout``)."""


class ChannelClosed(FlexosError):
    """The peer, still alive, dropped this one channel (e.g. its serving thread failed)."""


class ReplyTooLarge(ProtocolError):
    """A compartment sent a frame larger than its ``max_reply``: the call is abandoned and the
    channel dropped (the compartment keeps running; its other channels are unaffected)."""


#: How many channels a compartment may hold open to the app at once (the app serves each on a
#: thread of its own, with two eventfds): one per thread of the compartment that calls the app
#: concurrently. Past it the compartment's new channels are dropped on arrival.
PEER_CHANNELS = 64


class Channel(Protocol):
    def exchange(self, frame: bytes, deadline: float | None = None) -> bytes: ...
    def close(self) -> None: ...


class ServedChannel(Channel, Protocol):
    """A channel the peer opened, which a thread of ours serves (``Link.serve``)."""

    def send(self, frame: bytes) -> None: ...
    def recv(self, deadline: float | None = None) -> bytes: ...


class Transport(Protocol):
    """What a link uses. A transport whose peer can lend buffers also has ``borrow(payload)``."""

    #: The peer runs on the caller's thread: one re-entrant channel for every thread.
    inline: ClassVar[bool]

    def open_channel(self) -> Channel: ...
    def death(self) -> BaseException: ...
    def abort(self) -> None: ...
    def close(self) -> None: ...


ControlHandler = Callable[[bytes, list[int]], None]


class ServedTransport(ABC):
    """Base of the transports to another process: channels either side opens, control messages,
    and an accept loop serving the peer's channels until it goes away.

    ``death()`` says what the peer's death is (e.g. CompartmentCrashed with its exit status);
    ``abort``, when given, ends a peer that hangs (one we started), else ``abort()`` drops the
    connection. Against a peer we do not trust (the app's side of a compartment) ``max_frame``
    bounds every frame it sends us: ReplyTooLarge past it.
    """

    inline: ClassVar[bool] = False

    def __init__(
        self,
        death: Callable[[], BaseException],
        spin_us: float,
        abort: Callable[[], None] | None = None,
        *,
        max_frame: int | None = None,
    ) -> None:
        self._death = death
        self._spin_us = spin_us
        self._abort = abort
        self._max_frame = max_frame

    @abstractmethod
    def open_channel(self) -> ServedChannel: ...

    @abstractmethod
    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Send a control message (with file descriptors, where they can cross) to the peer."""

    @abstractmethod
    def accept_loop(self, link: Any, on_control: ControlHandler | None = None) -> None:
        """Serve the channels the peer opens until it goes away; then mark the link closed.

        Control messages go to ``on_control``, which owns the fds it is given.
        """

    def run(self, link: Any, on_control: ControlHandler | None = None, name: str = "") -> None:
        """Carry ``link``'s channels, accepting the peer's in a background thread."""
        link.attach(self)
        threading.Thread(
            target=self.accept_loop, args=(link, on_control), daemon=True, name=name or "flexos-accept"
        ).start()

    def death(self) -> BaseException:
        return self._death()

    def abort(self) -> None:
        """The peer hangs: end it if we can (we started it), else drop the connection."""
        if self._abort is not None:
            self._abort()
        else:
            self.close()

    @abstractmethod
    def forget(self) -> None:
        """After a fork: the connection is the parent's; let go of it without shutting it down."""

    @abstractmethod
    def close(self) -> None: ...


class DeadTransport:
    """The transport of a link that can no longer reach its peer (e.g. one inherited through
    fork()): every use raises what ``death`` makes."""

    inline: ClassVar[bool] = False

    def __init__(self, death: Callable[[], BaseException]) -> None:
        self._death = death

    def open_channel(self) -> Channel:
        raise self._death()

    def death(self) -> BaseException:
        return self._death()

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
