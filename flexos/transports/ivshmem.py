"""Channels laid out in one shared window between a host and a QEMU guest (``ivshmem-plain``).

Eventfds and file descriptors cannot cross into a virtual machine, so everything the shm transport
passes over its control socket lives in one window of shared memory instead: a memfd on the host,
the BAR2 of a stock ``ivshmem-plain`` PCI device in the guest. Layout::

    0       header: magic, layout version, slot count, capacity; the compartment's status word
    4096    slot 0: the agent's mailbox          slot 1: the compartment's mailbox
            slots 2 .. 2+OPENER_SLOTS-1: channels the host opens
            the rest: channels the guest opens

Every slot has the layout of a :class:`~flexos.transports.shm.RingChannel` region (the same class
moves the frames: exact-sequence publish, fragments acknowledged one by one), so only waiting
differs. Nothing here can wake the other side, so a waiter spins like a shm channel does, then
polls with a pause that doubles up to a few ms; the host's pause is a ``select`` on QEMU's
pidfd, so a dying VM wakes it at once.

A mailbox is a slot used as two independent queues of one message each (the receiver acknowledges
every message): channel openings, control messages and the agent's commands travel there.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from flexos.errors import FlexosError, ProtocolError
from flexos.transports import CallTimeout, ChannelClosed, ControlHandler, PeerGone, ServedTransport
from flexos.transports.shm import (
    _FLAG,
    _FRAGMENT,
    _HEADER,
    _LEN_FLAGS,
    _SEQ,
    DEFAULT_SPIN_US,
    RingChannel,
    _fence_lock,
)
from flexos.wire import control

MAGIC = b"flexosvm"
LAYOUT_VERSION = 1
WINDOW_SIZE = 16 << 20  # a power of two, as a PCI BAR must be
SLOTS = 64
OPENER_SLOTS = 31  # per side: slots 2..32 are the host's, 33..63 the guest's
AGENT_SLOT, COMPARTMENT_SLOT = 0, 1
_SLOTS_AT = 4096
_SLOT_SIZE = (WINDOW_SIZE - _SLOTS_AT) // SLOTS
CAPACITY = ((_SLOT_SIZE - _HEADER) // 2) & ~4095
_HEAD = struct.Struct("<8sIII")  # magic, layout version, slots, capacity
_STATUS_AT = 128
_STATUS = struct.Struct("<QiII")  # epoch, returncode, guest pid, state: one store, state last
IDLE, RUNNING, EXITED = 0, 1, 2
FIRST_PAUSE_S = 20e-6
# A waiter's pause doubles up to these. Under emulation every wake-up of an idle guest costs host
# CPU (a guest thread looking every 5 ms kept ~14% of a host core busy), so the guest looks less
# often than the host: a call after a lull in the traffic waits up to GUEST_CHANNEL_MAX_PAUSE_S
# longer; a control message (a new thread's first call, a restart) up to MAILBOX_MAX_PAUSE_S.
HOST_CHANNEL_MAX_PAUSE_S = 5e-3
GUEST_CHANNEL_MAX_PAUSE_S = 20e-3
MAILBOX_MAX_PAUSE_S = 50e-3
_SEQ_AT, _ACK_AT = 8, 16


def slot_offset(slot: int) -> int:
    return _SLOTS_AT + slot * _SLOT_SIZE


def host_slots() -> range:
    return range(2, 2 + OPENER_SLOTS)


def guest_slots() -> range:
    return range(2 + OPENER_SLOTS, SLOTS)


def format_window(mm: mmap.mmap) -> None:
    """Write the header of a fresh window (host side, before the guest boots)."""
    _HEAD.pack_into(mm, 0, MAGIC, LAYOUT_VERSION, SLOTS, CAPACITY)


def check_window(mm: mmap.mmap) -> None:
    """The guest's check that the host laid the window out as this version of flexos expects."""
    if len(mm) < WINDOW_SIZE or _HEAD.unpack_from(mm, 0) != (MAGIC, LAYOUT_VERSION, SLOTS, CAPACITY):
        raise ProtocolError("the shared window does not have this flexos version's layout")


def reset_slots(mm: mmap.mmap, slots: range) -> None:
    """Zero the flags and sequence numbers of ``slots`` (their payloads need no clearing)."""
    for slot in slots:
        base = slot_offset(slot)
        mm[base : base + _HEADER] = bytes(_HEADER)


def read_status(mm: mmap.mmap) -> tuple[int, int, int, int]:
    """(epoch, returncode, guest pid, state) of the compartment the agent runs."""
    return _STATUS.unpack_from(mm, _STATUS_AT)


def write_status(mm: mmap.mmap, epoch: int, returncode: int, pid: int, state: int) -> None:
    _STATUS.pack_into(mm, _STATUS_AT, epoch, returncode, pid, state)


class Liveness:
    """How one side waits when there is nothing to read: a pause, and a check that the peer lives."""

    channel_max_pause = GUEST_CHANNEL_MAX_PAUSE_S

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def check(self) -> None:
        """Raise PeerGone if the peer is known to be dead."""

    def wait_for(
        self,
        mm: mmap.mmap,
        offset: int,
        value: int,
        deadline: float | None,
        interrupted: Callable[[], None],
        max_pause: float,
    ) -> None:
        """Poll until the sequence number at ``offset`` is ``value``, pausing longer each time, until
        ``deadline`` (monotonic; CallTimeout past it); ``interrupted`` raises to give up (the waiter
        or the peer closed)."""
        pause = FIRST_PAUSE_S
        while _SEQ.unpack_from(mm, offset)[0] != value:
            interrupted()
            self.check()
            if deadline is not None and time.monotonic() > deadline:
                raise CallTimeout()
            self.pause(pause)
            pause = min(pause * 2, max_pause)


class WindowChannel(RingChannel):
    """One side of a channel in a slot of the window: a shm channel's frames, polling instead of eventfds."""

    def __init__(
        self,
        mm: mmap.mmap,
        slot: int,
        side: int,
        liveness: Liveness,
        spin_us: float = DEFAULT_SPIN_US,
        max_frame: int | None = None,
    ) -> None:
        super().__init__(mm, slot_offset(slot), side, CAPACITY, spin_us, max_frame)
        self._liveness = liveness

    def _wake_peer(self) -> None:
        pass  # nobody here sleeps on a flag (should a hostile peer set one, nothing happens)

    def _block(self, offset: int, value: int, deadline: float | None = None) -> None:
        self._liveness.wait_for(self._mm, offset, value, deadline, self._interrupted, self._liveness.channel_max_pause)

    def _interrupted(self) -> None:
        if _FLAG.unpack_from(self._mm, self._peer_closed)[0]:
            raise ChannelClosed()
        if self.closed:
            raise PeerGone()

    @property
    def peer_done(self) -> bool:
        """The peer closed its side too: the slot may be used again."""
        return bool(_FLAG.unpack_from(self._mm, self._peer_closed)[0])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            _FLAG.pack_into(self._mm, self._my_closed, 1)
        except (ValueError, TypeError):  # the window is already unmapped
            pass


class Mailbox:
    """A slot used as two one-message queues (one per direction), each message acknowledged."""

    def __init__(self, mm: mmap.mmap, slot: int, side: int, liveness: Liveness) -> None:
        base = slot_offset(slot)
        self._mm = mm
        self._liveness = liveness
        self._out_hdr, self._in_hdr = (base + 128, base + 192) if side == 0 else (base + 192, base + 128)
        self._out_payload = base + (_HEADER if side == 0 else _HEADER + CAPACITY)
        self._in_payload = base + (_HEADER + CAPACITY if side == 0 else _HEADER)
        self._out_seq = 0
        self._in_seq = 0
        self._send_lock = threading.Lock()
        self.closed = False

    def _wait(self, offset: int, value: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._liveness.wait_for(self._mm, offset, value, deadline, self._interrupted, MAILBOX_MAX_PAUSE_S)

    def _interrupted(self) -> None:
        if self.closed:
            raise PeerGone()

    def send(self, message: list, timeout: float | None = None) -> None:
        data = control.encode(message)
        if len(data) > CAPACITY:
            raise FlexosError(f"a control message of {len(data)} bytes does not fit the window ({CAPACITY})")
        with self._send_lock:
            self._wait(self._out_hdr + _ACK_AT, self._out_seq, timeout)  # the previous one was read
            mm = self._mm
            mm[self._out_payload : self._out_payload + len(data)] = data
            self._out_seq += 1
            _FRAGMENT.pack_into(mm, self._out_hdr, len(data), 0, self._out_seq)
            _fence_lock.acquire()
            _fence_lock.release()

    def recv(self, timeout: float | None = None) -> list:
        """The peer's next message (a list); anything else is a ProtocolError."""
        expected = self._in_seq + 1
        self._wait(self._in_hdr + _SEQ_AT, expected, timeout)
        mm = self._mm
        size, _flags = _LEN_FLAGS.unpack_from(mm, self._in_hdr)
        if size > CAPACITY:
            raise ProtocolError(f"corrupt mailbox header (length {size})")
        data = mm[self._in_payload : self._in_payload + size]
        self._in_seq = expected
        _SEQ.pack_into(mm, self._in_hdr + _ACK_AT, expected)
        return control.decode(data)


class WindowTransport(ServedTransport):
    """Channels to the peer on the other side of the window, opened and announced over a mailbox.

    The opener of a channel is its side 0: it takes a free slot of its own range, zeroes it, and
    tells the peer's accept loop (a channel-opened message), which serves it on a new thread. A slot is
    free again once both sides have closed it. The peer's own slots bound the channels it can have
    served; an opening of a slot still being served is ignored (it would start a second server).
    """

    def __init__(
        self,
        mm: mmap.mmap,
        host: bool,
        liveness: Liveness,
        death: Callable[[], BaseException],
        spin_us: float = DEFAULT_SPIN_US,
        abort: Callable[[], None] | None = None,
        *,
        max_frame: int | None = None,
    ) -> None:
        super().__init__(death, spin_us, abort, max_frame=max_frame)
        self._mm = mm
        self._mine, self._theirs = (host_slots(), guest_slots()) if host else (guest_slots(), host_slots())
        self._mailbox = Mailbox(mm, COMPARTMENT_SLOT, 0 if host else 1, liveness)
        self._liveness = liveness
        self._opened: dict[int, WindowChannel] = {}
        self._accepted: dict[int, WindowChannel] = {}  # by slot
        self._lock = threading.Lock()

    @property
    def mailbox(self) -> Mailbox:
        return self._mailbox

    def open_channel(self) -> WindowChannel:
        with self._lock:
            for slot in self._mine:
                previous = self._opened.get(slot)
                if previous is None or (previous.closed and previous.peer_done):
                    break
            else:
                raise FlexosError(f"all {len(self._mine)} channels of the window are in use (one per thread in a call)")
            reset_slots(self._mm, range(slot, slot + 1))
            channel = WindowChannel(self._mm, slot, 0, self._liveness, self._spin_us, self._max_frame)
            self._opened[slot] = channel
        try:
            self._mailbox.send(control.channel_opened(slot))
        except PeerGone:
            channel.close()
            raise
        return channel

    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            raise FlexosError("file descriptors cannot be passed into a virtual machine")
        self._mailbox.send(control.window_control(message))

    def accept_loop(self, link: Any, on_control: ControlHandler | None = None) -> None:
        try:
            while True:
                try:
                    message = self._mailbox.recv()
                except (PeerGone, ProtocolError):
                    break
                try:
                    verb, value = control.read_window_message(message)
                except ProtocolError:
                    continue  # nothing to act on
                if isinstance(value, int) and verb == control.OPEN and value in self._theirs:
                    with self._lock:
                        serving = self._accepted.get(value)
                        if serving is not None and not serving.closed:
                            continue
                        channel = WindowChannel(self._mm, value, 1, self._liveness, self._spin_us, self._max_frame)
                        self._accepted[value] = channel
                    threading.Thread(target=link.serve, args=(channel,), daemon=True, name="flexos-serve").start()
                elif isinstance(value, bytes) and on_control is not None:
                    on_control(value, [])
        finally:
            link.closed = True

    def forget(self) -> None:
        self._mailbox.closed = True  # the window is the parent's: stop without touching it

    def close(self) -> None:
        self._mailbox.closed = True
        with self._lock:
            for channel in [*self._opened.values(), *self._accepted.values()]:
                channel.close()
