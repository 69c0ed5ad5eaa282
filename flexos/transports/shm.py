"""A shared-memory channel between two processes: spin, or block on an eventfd, as the peer's
placement makes right.

On these VMs a blocking wake-up that crosses cores costs ~70 µs while a spinning reader sees a
write in ~1 µs, so a waiting side polls the shared sequence number while the peer runs on
another CPU; when the peer needs our CPU, spinning only delays it, so it blocks at once
(RingChannel._wait learns which holds). Layout of the shared region::

    0    side 0 "sleeping", "closed" (u32s)    64   side 1: the same
    128  direction 0->1: len u32, flags u32, seq u64, ack u64
    192  direction 1->0: same
    256  payload 0->1 [capacity]            256+capacity  payload 1->0 [capacity]

A writer publishes a fragment by storing its payload, then len, flags and the next sequence
number in one ``pack_into`` (which stores fields in order, so seq lands last); a reader waits for
that exact number (``pack_into`` is not atomic, so "non-zero" is not a safe signal). A channel is
a strictly alternating conversation, so a frame from the peer proves it consumed ours. A reader
acknowledges each frame as it picks it up (its sequence number in "ack"): a writer waits for that
only between the fragments of a frame larger than the capacity, and a spinning writer reads it
to learn whether the peer runs at all (the adaptive wait, RingChannel._wait). A reader stops at
``max_frame`` bytes of one frame (ReplyTooLarge) instead of reassembling whatever the peer sends,
and a deadline holds for a whole frame, however slowly its fragments come.

Going to sleep is a Dekker handshake (store my flag, load the peer's sequence number) against the
writer's (store the sequence number, load my flag). x86 may reorder a store before a later load,
so both sides issue a full fence in between: acquiring a ``threading.Lock`` executes a locked
instruction, which drains the store buffer. The poll timeout only bounds the damage should that
reasoning ever fail on some platform.

:class:`RingChannel` is that layout and its frames; :class:`ShmChannel` waits and wakes with
eventfds, the ivshmem transport's channels by polling (:mod:`flexos.transports.ivshmem`).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from flexos._ring import (
    ARRIVED,
    CLOSED,
    GONE,
    MISSED,
    NEEDS_CPU,
    NOT_SPUN,
    PARKED_AGAIN,
    PEER_CLOSED,
    PEER_GONE,
    Ring,
    hold_spin,
    spinners,
)
from flexos.errors import ProtocolError
from flexos.transports import CallTimeout, ChannelClosed, ControlHandler, PeerGone, ReplyTooLarge, ServedTransport
from flexos.wire.control import CONTROL_MAX, OPEN_CHANNEL

_SEQ = struct.Struct("<Q")
_FLAG = struct.Struct("<I")
_FRAGMENT = struct.Struct("<IIQ")  # len, flags, seq: one store sequence, seq last
_LEN_FLAGS = struct.Struct("<II")
_SEQ_AT, _ACK_AT = 8, 16
_MORE = 1
_HEADER = 256
_BLOCK_POLL_MS = 100
DEFAULT_CAPACITY = 1 << 20
DEFAULT_SPIN_US = 200
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

_fence_lock = threading.Lock()
_CHECKS_PER_CLOCK_READ = 16
# The adaptive wait (RingChannel._wait): the least a spinning channel's budget shrinks to, a
# parking channel's probing spin, and how often it probes (doubling while probes fail).
_SPIN_FLOOR_NS = 20_000
_PROBE_SPIN_NS = 100_000
_PROBE_EVERY_MIN, _PROBE_EVERY_MAX = 16, 1024
_SUSPICIONS_TO_PARK = 3
_SLOW_WAITS_TO_GROW = 4  # parked waits in a row that a longer spin would have caught
_PREEMPTED_NS = 20_000  # a gap this long between two looks at the clock: we did not run
_now_ns = time.monotonic_ns  # how long a park took (a module attribute: tests script it)


class RingChannel(ABC):
    """The frames of one side (0 or 1) of a channel laid out at ``base`` in ``mm`` (the layout
    above); how a side waits for the peer, and wakes it, is the subclass's. ``max_frame`` bounds
    the frames read (None: only memory does)."""

    #: The peer runs where we may run (a child or parent process, which inherited our affinity).
    peer_inherits_affinity = False

    def __init__(
        self, mm: mmap.mmap, base: int, side: int, capacity: int, spin_us: float, max_frame: int | None = None
    ) -> None:
        self._mm = mm
        self._capacity = capacity
        self._max_frame = max_frame
        # The largest frame taken on the fast path of exchange(); anything else goes through recv().
        self._fast_limit = capacity if max_frame is None else min(capacity, max_frame)
        self._my_sleep = base + (0 if side == 0 else 64)
        self._peer_sleep = base + (64 if side == 0 else 0)
        self._my_closed = self._my_sleep + 4
        self._peer_closed = self._peer_sleep + 4
        self._out_hdr, self._in_hdr = (base + 128, base + 192) if side == 0 else (base + 192, base + 128)
        self._out_payload = base + (_HEADER if side == 0 else _HEADER + capacity)
        self._in_payload = base + (_HEADER + capacity if side == 0 else _HEADER)
        self._out_seq = 0
        self._in_seq = 0
        self._budget_max = int(spin_us * 1000)  # ns, as every spin budget below
        self._budget = self._budget_max
        # Confined to one CPU (taskset, a one-CPU container), a spin could only delay a peer that
        # shares it: start out parking, and never probe if the peer inherited our affinity.
        one_cpu = len(os.sched_getaffinity(0)) == 1
        self._parking = one_cpu or not self._budget_max
        self._never_spin = one_cpu and self.peer_inherits_affinity
        self._probe_every = _PROBE_EVERY_MAX if one_cpu else _PROBE_EVERY_MIN
        self._waits_since_probe = 0
        self._suspicions = 0  # spins in a row that found the peer could not run
        self._slow_waits = 0  # parked waits in a row that ended within the most we spin
        self._spun_at_slow_wait = 0  # ``spun`` at the last of them
        # What stores a frame and what polls for one: attributes, so that a subclass's C versions
        # are called without a Python frame in between.
        self._publish: Callable[[int, bytes | memoryview, int, int, int, int], bool] = self._python_publish
        self._poll_for: Callable[[int, int, int], int] = self._python_poll_for
        self.spun = 0  # waits that ended while spinning
        self.missed = 0  # spins that ended without the frame
        self.parked = 0  # waits that blocked
        self.closed = False

    @abstractmethod
    def _block(self, offset: int, value: int, deadline: float | None = None) -> None:
        """Wait, past the spinning window, until the sequence number at ``offset`` is ``value``
        (CallTimeout once ``time.monotonic()`` passes ``deadline``)."""

    @abstractmethod
    def _wake_peer(self) -> None:
        """The peer said it sleeps: wake it (a frame or an acknowledgement is there)."""

    # -- the hot path ---------------------------------------------------------------------------
    def exchange(self, frame: bytes, deadline: float | None = None) -> bytes:
        """Send ``frame`` and return the peer's next one, both whole by ``deadline`` (monotonic)."""
        # send() and recv() inlined for the common case: one small frame each way.
        size = len(frame)
        if size > self._capacity:
            self._send_fragments(frame, deadline)
            return self.recv(deadline)
        seq = self._out_seq = self._out_seq + 1
        if self._publish(self._out_payload, frame, self._out_hdr, 0, seq, self._peer_sleep):
            self._wake_peer()
        expected = self._in_seq + 1
        if _SEQ.unpack_from(self._mm, self._in_hdr + _SEQ_AT)[0] != expected:
            self._wait(self._in_hdr + _SEQ_AT, expected, deadline)
        return self._take(expected, deadline)

    def _take(self, expected: int, deadline: float | None) -> bytes:
        """The peer's frame numbered ``expected``, which has arrived (its first fragment, at least)."""
        mm = self._mm
        hdr = self._in_hdr
        size, flags = _LEN_FLAGS.unpack_from(mm, hdr)
        if flags or size > self._fast_limit:
            return self.recv(deadline, resume=True)
        self._in_seq = expected
        _SEQ.pack_into(mm, hdr + _ACK_AT, expected)  # picked up: tells a spinning peer we run
        start = self._in_payload
        return mm[start : start + size]

    def send(self, frame: bytes) -> None:
        size = len(frame)
        if size > self._capacity:
            return self._send_fragments(frame)
        seq = self._out_seq = self._out_seq + 1
        if self._publish(self._out_payload, frame, self._out_hdr, 0, seq, self._peer_sleep):
            self._wake_peer()

    def _send_fragments(self, frame: bytes, deadline: float | None = None) -> None:
        hdr, capacity = self._out_hdr, self._capacity
        view = memoryview(frame)
        start = self._out_payload
        for pos in range(0, len(frame), capacity):
            if pos:  # the peer acknowledges each fragment before we overwrite it
                self._wait(hdr + _ACK_AT, self._out_seq, deadline)
            chunk = view[pos : pos + capacity]
            more = _MORE if pos + len(chunk) < len(frame) else 0
            seq = self._out_seq = self._out_seq + 1
            if self._publish(start, chunk, hdr, more, seq, self._peer_sleep):
                self._wake_peer()

    def recv(self, deadline: float | None = None, *, resume: bool = False) -> bytes:
        """The peer's next frame, whole by ``deadline``. ``resume``: its first fragment has
        already been seen arriving."""
        mm = self._mm
        hdr = self._in_hdr
        parts: list[bytes] = []
        received = 0
        while True:
            expected = self._in_seq + 1
            if resume:
                resume = False
            elif _SEQ.unpack_from(mm, hdr + _SEQ_AT)[0] != expected:
                self._wait(hdr + _SEQ_AT, expected, deadline)
            size, flags = _LEN_FLAGS.unpack_from(mm, hdr)
            if size > self._capacity or flags & ~_MORE:
                raise ProtocolError(f"corrupt channel header (length {size}, flags {flags})")
            received += size
            if self._max_frame is not None and received > self._max_frame:
                self._drop_oversized()
            start = self._in_payload
            data = mm[start : start + size]
            self._in_seq = expected
            if not flags:
                _SEQ.pack_into(mm, hdr + _ACK_AT, expected)
                if parts:
                    parts.append(data)
                    return b"".join(parts)
                return data
            parts.append(data)
            _SEQ.pack_into(mm, hdr + _ACK_AT, expected)
            _fence_lock.acquire()
            _fence_lock.release()
            if _FLAG.unpack_from(mm, self._peer_sleep)[0]:
                self._wake_peer()

    def _drop_oversized(self) -> NoReturn:
        """Stop reading a frame past ``max_frame``: mark our side closed (the peer, waiting for our
        acknowledgement or later for our next frame, gets ChannelClosed) and give up. Its memory
        stays mapped until ``close()``, so a caller further up this channel's stack is told by
        the peer's closing, not by a crash."""
        _FLAG.pack_into(self._mm, self._my_closed, 1)
        _fence_lock.acquire()
        _fence_lock.release()
        self._wake_peer()
        raise ReplyTooLarge(f"a frame over the max_reply of {self._max_frame} bytes arrived; its channel was dropped")

    def _wait(self, offset: int, value: int, deadline: float | None = None) -> None:
        """Wait until the sequence number at ``offset`` is ``value``: spin, or park at once.

        Which is right depends on where the peer runs, so the channel learns it from its own
        waits (adaptive spin-then-park, as adaptive mutexes do). A spin that ends empty-handed
        says why (``_poll_for``): either we were preempted mid-spin (someone else wanted our
        CPU, perhaps the peer), or the peer runs elsewhere and is just not done. Where the peer
        last ran is no evidence: on a quiet machine the wake-ups of two parking sides make the
        scheduler place them on one CPU, so that signal would keep them parking side by side,
        while two spinning sides get spread over the CPUs by its load balancer.

        - *spinning*: spin up to the budget. If the peer could not run, spinning only delays it:
          park from now on. If it runs elsewhere and picked our frame up (its ack), this is a
          slow call or the pause before the app's next call: halve the budget (down to a floor),
          so that a compartment waiting for its next call does not burn a CPU; a frame that
          took most of the budget doubles it again. But when every wait in a row ends (parked)
          within the most we spin, the peer's calls are just slower than the budget: the
          fourth such wait sets the budget to twice its length, so that the next ones end
          spinning, not in a wake-up. (One such wait among answers found spinning is the peer
          preempted on a busy machine, where spinning longer would only steal its CPU.)
        - *parking*: block on the first miss, one hand-over per wait (no yield loops); every
          ``_probe_every`` waits (doubling while probes find the peer needs our CPU) one short
          spin probes whether it runs elsewhere now.

        One thread per process spins at a time (a spinner holds the GIL; a second would keep the
        first from seeing its reply): ``_ring.spinners()`` counts them, in every interpreter. A
        channel confined to one CPU starts out parking, and never probes when its peer is
        confined with it (:attr:`peer_inherits_affinity`).
        """
        if spinners():
            self.parked += 1
            return self._block(offset, value, deadline)
        if self._parking:
            self._waits_since_probe += 1
            if self._waits_since_probe >= self._probe_every and not self._never_spin:
                self._waits_since_probe = 0
                outcome = self._spin(offset, value, min(self._budget_max, _PROBE_SPIN_NS))
                if outcome != NEEDS_CPU:  # the peer answered, or could have: it runs beside us
                    self._parking = False
                    self._budget = self._budget_max
                    self._probe_every = _PROBE_EVERY_MIN
                    if outcome >= 0:
                        return None
                else:
                    self._probe_every = min(2 * self._probe_every, _PROBE_EVERY_MAX)
            self.parked += 1
            return self._block(offset, value, deadline)
        budget = self._budget
        outcome = self._spin(offset, value, budget)
        if outcome >= 0:
            self._suspicions = 0
            return None
        return self._park_after_miss(outcome, budget, offset, value, deadline)

    def _park_after_miss(self, outcome: int, budget: int, offset: int, value: int, deadline: float | None) -> None:
        """A spin of ``budget`` ns ended without the frame (MISSED or NEEDS_CPU): park until it
        comes, and learn to park from now on, or how long to spin next time (``_wait`` says why)."""
        self.parked += 1
        if outcome == NEEDS_CPU:
            self._suspicions += 1
            if self._suspicions >= _SUSPICIONS_TO_PARK:  # one could be the VM's steal time
                self._parking = True
                self._waits_since_probe = 0
            return self._block(offset, value, deadline)
        if not self._peer_took_last():  # not picked up yet: the peer may be waking, nothing to learn
            return self._block(offset, value, deadline)
        parked_at = _now_ns()
        self._block(offset, value, deadline)
        waited = budget + _now_ns() - parked_at
        if waited > self._budget_max:
            self._slow_waits = 0
        else:  # one more in a row, unless a spin found an answer since the last
            self._slow_waits = self._slow_waits + 1 if self.spun == self._spun_at_slow_wait else 1
            self._spun_at_slow_wait = self.spun
            if self._slow_waits >= _SLOW_WAITS_TO_GROW:
                self._slow_waits = 0
                self._budget = min(self._budget_max, 2 * waited)
                return None
        self._budget = max(_SPIN_FLOOR_NS, budget // 2)
        return None

    def _spun_for(self, took: int) -> None:
        """A spin found the frame after ``took`` ns: one that took most of the budget allows more."""
        self.spun += 1
        if took > self._budget // 2:
            self._budget = min(self._budget_max, 2 * self._budget)

    def _peer_took_last(self) -> bool:
        """The peer picked up the last frame we sent (or we sent none)."""
        return bool(_SEQ.unpack_from(self._mm, self._out_hdr + _ACK_AT)[0] == self._out_seq)

    def _spin(self, offset: int, value: int, budget: int) -> int:
        """Spin up to ``budget`` ns for the sequence number at ``offset`` to be ``value``: the ns
        it took, or MISSED, or NEEDS_CPU (see ``_poll_for``)."""
        hold_spin(1)
        try:
            outcome = self._poll_for(offset, value, budget)
        finally:
            hold_spin(-1)
        if outcome < 0:
            self.missed += 1
        else:
            self._spun_for(outcome)
        return outcome

    # -- the primitives, in Python (ShmChannel's are flexos/_ring.c's) ----------------------------
    def _python_publish(
        self, payload_off: int, frame: bytes | memoryview, hdr_off: int, flags: int, seq: int, peer_sleep_off: int
    ) -> bool:
        """Store ``frame`` and its header (``seq`` last), fence: does the peer sleep?"""
        mm = self._mm
        size = len(memoryview(frame))
        mm[payload_off : payload_off + size] = frame
        _FRAGMENT.pack_into(mm, hdr_off, size, flags, seq)
        _fence_lock.acquire()
        _fence_lock.release()
        return bool(_FLAG.unpack_from(mm, peer_sleep_off)[0])

    def _python_poll_for(self, offset: int, value: int, budget: int) -> int:
        """Poll the sequence number at ``offset`` until it is ``value``: the ns it took; once
        ``budget`` ns are spent, NEEDS_CPU if we were preempted meanwhile, else MISSED."""
        mm = self._mm
        unpack = _SEQ.unpack_from
        clock = time.perf_counter_ns
        start = last = clock()
        preempted = False
        while True:
            for _ in range(_CHECKS_PER_CLOCK_READ):
                if unpack(mm, offset)[0] == value:
                    return clock() - start
            now = clock()
            preempted |= now - last > _PREEMPTED_NS
            last = now
            if now - start > budget:
                return NEEDS_CPU if preempted else MISSED


def _kept_in_ring(name: str) -> Any:
    """A RingChannel attribute that a ShmChannel keeps in its Ring (``self._ring``), where
    Ring.exchange reads and updates it without a Python frame."""
    return property(lambda self: getattr(self._ring, name), lambda self, value: setattr(self._ring, name, value))


class ShmChannel(RingChannel):
    """One side (0 or 1) of a shared-memory channel between two processes: a sealed memfd, and an
    eventfd per side that a sleeping side blocks on."""

    peer_inherits_affinity = True

    def __init__(
        self,
        fds: tuple[int, int, int],
        side: int,
        watch_fd: int,
        watch_events: int,
        capacity: int = DEFAULT_CAPACITY,
        spin_us: float = DEFAULT_SPIN_US,
        max_frame: int | None = None,
    ) -> None:
        mem_fd, efd0, efd1 = fds
        size = _HEADER + 2 * capacity
        if os.fstat(mem_fd).st_size != size or fcntl.fcntl(mem_fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise ProtocolError("channel memory is not a sealed region of the agreed size")
        mm = mmap.mmap(mem_fd, size)
        os.close(mem_fd)
        self._ring = ring = Ring(mm)  # before the base's state: some of it lives there
        super().__init__(mm, 0, side, capacity, spin_us, max_frame)
        self._publish, self._poll_for = ring.publish, ring.spin
        self._efds = (efd0, efd1)
        self._my_efd = efd0 if side == 0 else efd1
        self._peer_efd = efd1 if side == 0 else efd0
        self._watch_fd = watch_fd
        self._watch_events = watch_events
        ring.route(
            self._out_payload,
            self._out_hdr,
            self._in_payload,
            self._in_hdr,
            self._peer_sleep,
            self._my_sleep,
            self._peer_closed,
            self._peer_efd,
            self._my_efd,
            watch_fd,
            watch_events,
            self._fast_limit,
            capacity,
            self._never_spin,  # the peer is confined to our one CPU: hand it over when we park
        )
        self._ring_exchange = ring.exchange

    @classmethod
    def create(
        cls,
        watch_fd: int,
        watch_events: int,
        capacity: int = DEFAULT_CAPACITY,
        spin_us: float = DEFAULT_SPIN_US,
        max_frame: int | None = None,
    ) -> tuple[ShmChannel, list[int]]:
        """Side 0 of a new channel, and the fds to hand to the peer (which it then owns)."""
        mem_fd = os.memfd_create("flexos-channel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(mem_fd, _HEADER + 2 * capacity)
        # Sealed so that the peer cannot shrink it under us (a SIGBUS on our next access).
        fcntl.fcntl(mem_fd, fcntl.F_ADD_SEALS, _SEALS)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        efd0, efd1 = os.eventfd(0, flags), os.eventfd(0, flags)
        peer_fds = [os.dup(mem_fd), os.dup(efd0), os.dup(efd1)]
        return cls((mem_fd, efd0, efd1), 0, watch_fd, watch_events, capacity, spin_us, max_frame), peer_fds

    # What Ring.exchange keeps up to date itself: the base class's attributes, stored in the Ring.
    _out_seq = _kept_in_ring("out_seq")
    _in_seq = _kept_in_ring("in_seq")
    spun = _kept_in_ring("spun")
    _suspicions = _kept_in_ring("suspicions")

    def exchange(self, frame: bytes, deadline: float | None = None) -> bytes:
        """RingChannel.exchange with its common case in one C call (``Ring.exchange``): publish,
        wake the peer if it sleeps, then spin or park as the policy of ``_wait`` says, and take
        a one-fragment reply (counting a spin that found it). What that call leaves to decide
        comes back as an outcome."""
        if len(frame) > self._capacity:
            return super().exchange(frame, deadline)
        return self._round_trip(frame, deadline)

    def recv(self, deadline: float | None = None, *, resume: bool = False) -> bytes:
        """RingChannel.recv, its common case as the second half of :meth:`exchange` (a server
        that sent its reply, then freed what the peer dropped, waits so for the next call)."""
        if resume:
            return super().recv(deadline, resume=True)
        return self._round_trip(None, deadline)

    def _round_trip(self, frame: bytes | None, deadline: float | None) -> bytes:
        """Publish ``frame`` (None: nothing), then wait for the peer's next frame and take it."""
        if not self._parking:
            budget = self._budget
            got = self._ring_exchange(frame, budget, 0)
            if isinstance(got, bytes):
                return got
            expected = self._in_seq + 1
            if got >= 0:  # there, but not taken: a spin that took most of the budget, or fragments
                self._spun_for(got)
                self._suspicions = 0
                return self._take(expected, deadline)
            if got != NOT_SPUN:  # MISSED or NEEDS_CPU
                self.missed += 1
                self._park_after_miss(got, budget, self._in_hdr + _SEQ_AT, expected, deadline)
                return self._take(expected, deadline)
        elif deadline is None and (self._never_spin or self._waits_since_probe + 1 < self._probe_every):
            self._waits_since_probe += 1  # a plain hand-over: no probe is due
            self.parked += 1
            got = self._ring_exchange(frame, 0, _BLOCK_POLL_MS)
            if isinstance(got, bytes):
                return got
            expected = self._in_seq + 1
            if got == PEER_CLOSED:
                raise ChannelClosed()
            if got == PEER_GONE:
                raise PeerGone()
            if got == PARKED_AGAIN:
                self._block(self._in_hdr + _SEQ_AT, expected, deadline)
            return self._take(expected, deadline)
        else:  # a probe is due, or a deadline holds: publish here, and wait as _wait decides
            got = self._ring_exchange(frame, 0, 0)
            if isinstance(got, bytes):  # already there, and taken
                return got
            expected = self._in_seq + 1
        if got == NOT_SPUN:
            self._wait(self._in_hdr + _SEQ_AT, expected, deadline)
        return self._take(expected, deadline)

    def _wake_peer(self) -> None:
        try:
            os.eventfd_write(self._peer_efd, 1)
        except BlockingIOError:  # the peer (which holds this eventfd too) saturated its counter:
            pass  # it is readable, so the peer's poll() returns anyway

    def _block(self, offset: int, value: int, deadline: float | None = None) -> None:
        park, watch_fd, watch_events = self._ring.park, self._watch_fd, self._watch_events
        my_sleep, peer_closed, my_efd = self._my_sleep, self._peer_closed, self._my_efd
        wait_ms = _BLOCK_POLL_MS
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CallTimeout()
                wait_ms = min(_BLOCK_POLL_MS, int(left * 1000) + 1)
            status = park(my_sleep, offset, value, peer_closed, my_efd, watch_fd, watch_events, wait_ms)
            if status == ARRIVED:
                return
            if status == CLOSED:
                raise ChannelClosed()
            if status == GONE or self.closed:
                raise PeerGone()

    def close(self) -> None:
        """Close this side, and tell a peer that may be waiting on it."""
        if self.closed:
            return
        self.closed = True
        try:
            _FLAG.pack_into(self._mm, self._my_closed, 1)
            _fence_lock.acquire()
            _fence_lock.release()
            os.eventfd_write(self._peer_efd, 1)
        except (OSError, ValueError):
            pass
        for fd in self._efds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._ring.release()
        try:
            self._mm.close()
        except BufferError:
            pass


class ShmTransport(ServedTransport):
    """Shared-memory channels to one peer process, set up over a control socket.

    Either side may open a channel: it creates and seals the memory and two eventfds, and passes
    them over the SOCK_SEQPACKET control socket; the other side's accept loop starts a thread
    serving it. ``watch_fd`` becomes readable (a pidfd) or hangs up (the socket) when the peer
    dies, which wakes any blocked waiter. ``peer_channels`` bounds the channels the peer may have
    us serve at once: one more is closed on arrival, which its opener sees as ChannelClosed.
    """

    def __init__(
        self,
        sock: socket.socket,
        watch_fd: int,
        watch_events: int,
        death: Callable[[], BaseException],
        spin_us: float = DEFAULT_SPIN_US,
        abort: Callable[[], None] | None = None,
        *,
        max_frame: int | None = None,
        peer_channels: int | None = None,
    ) -> None:
        super().__init__(death, spin_us, abort, max_frame=max_frame)
        self._peer_channels = peer_channels
        self._served: list[ShmChannel] = []  # the peer's channels; only the accept loop changes the list
        self._sock = sock
        self._watch = (watch_fd, watch_events)
        self._send_lock = threading.Lock()

    def open_channel(self) -> ShmChannel:
        channel, fds = ShmChannel.create(*self._watch, spin_us=self._spin_us, max_frame=self._max_frame)
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [OPEN_CHANNEL], fds)
        except OSError:
            channel.close()
            raise PeerGone() from None
        finally:
            for fd in fds:
                os.close(fd)
        return channel

    def _admit(self, channel: ShmChannel) -> bool:
        """Count ``channel`` among those we serve, unless the peer already holds ``peer_channels``."""
        live = [served for served in self._served if not served.closed]
        admitted = self._peer_channels is None or len(live) < self._peer_channels
        if admitted:
            live.append(channel)
        self._served = live
        return admitted

    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        with self._send_lock:
            socket.send_fds(self._sock, [message], list(fds))

    def accept_loop(self, link: Any, on_control: ControlHandler | None = None) -> None:
        try:
            while True:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(self._sock, CONTROL_MAX, 3)
                except OSError:
                    break
                if not message:
                    break
                if message != OPEN_CHANNEL and on_control is not None:
                    on_control(message, fds)
                    continue
                try:
                    if message != OPEN_CHANNEL or len(fds) != 3:
                        raise ProtocolError("unexpected control message")
                    channel = ShmChannel(
                        (fds[0], fds[1], fds[2]), 1, *self._watch, spin_us=self._spin_us, max_frame=self._max_frame
                    )
                except (ProtocolError, OSError, ValueError):
                    for fd in fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                    continue
                if not self._admit(channel):
                    channel.close()  # one too many: its opener's call fails (ChannelClosed)
                    continue
                threading.Thread(target=link.serve, args=(channel,), daemon=True, name="flexos-serve").start()
        finally:
            link.closed = True

    def forget(self) -> None:
        self._sock.close()  # only this process's descriptor: no shutdown()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
