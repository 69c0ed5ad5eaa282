"""A shared-memory channel between two processes: spin briefly, then block on an eventfd.

On these VMs a blocking wake-up that crosses cores costs ~70 µs while a spinning reader sees a
write in ~1 µs, so a waiting side polls the shared sequence number for a short window (the cost
of one wake-up) and only then sleeps. Layout of the shared region::

    0    side 0 "sleeping" flag (u32)        64   side 1 "sleeping" flag (u32)
    128  direction 0->1: seq u64, ack u64, len u32, flags u32
    192  direction 1->0: same
    256  payload 0->1 [capacity]            256+capacity  payload 1->0 [capacity]

A writer publishes a fragment by storing its payload and length, then the next sequence number;
a reader waits for that exact number (``struct.pack_into`` is not atomic, so "non-zero" is not
a safe signal) and acknowledges it. Frames larger than the capacity travel as fragments, each
acknowledged before the next is written.

Going to sleep is a Dekker handshake (store my flag, load the peer's sequence number) against the
writer's (store the sequence number, load my flag). x86 may reorder a store before a later load,
so both sides issue a full fence in between: acquiring a ``threading.Lock`` executes a locked
instruction, which drains the store buffer. The poll timeout only bounds the damage should that
reasoning ever fail on some platform.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from flexos.errors import ProtocolError
from flexos.transports import PeerGone

_SEQ = struct.Struct("<Q")
_FLAG = struct.Struct("<I")
_LEN_FLAGS = struct.Struct("<II")
_MORE = 1
_HEADER = 256
_BLOCK_POLL_MS = 100
DEFAULT_CAPACITY = 1 << 20
DEFAULT_SPIN_US = 200

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_OPEN = b"open"

_fence_lock = threading.Lock()


def _spin_checks_for(spin_us: float) -> int:
    """How many sequence checks fit in ``spin_us`` on this machine (calibrated once)."""
    global _check_cost_s
    if _check_cost_s is None:
        mm = mmap.mmap(-1, 64)
        unpack = _SEQ.unpack_from
        start = time.perf_counter()
        for _ in range(20000):
            if unpack(mm, 0)[0] == 1:
                break
        _check_cost_s = max((time.perf_counter() - start) / 20000, 1e-8)
        mm.close()
    return max(1, int(spin_us * 1e-6 / _check_cost_s))


_check_cost_s: float | None = None


class ShmChannel:
    """One side (0 or 1) of a shared-memory channel."""

    def __init__(
        self,
        fds: tuple[int, int, int],
        side: int,
        watch_fd: int,
        watch_events: int,
        capacity: int = DEFAULT_CAPACITY,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        mem_fd, efd0, efd1 = fds
        size = _HEADER + 2 * capacity
        if os.fstat(mem_fd).st_size != size or fcntl.fcntl(mem_fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise ProtocolError("channel memory is not a sealed region of the agreed size")
        self._mm = mmap.mmap(mem_fd, size)
        os.close(mem_fd)
        self._efds = (efd0, efd1)
        self._my_efd = efd0 if side == 0 else efd1
        self._peer_efd = efd1 if side == 0 else efd0
        self._capacity = capacity
        self._my_sleep = 0 if side == 0 else 64
        self._peer_sleep = 64 if side == 0 else 0
        self._out_hdr, self._in_hdr = (128, 192) if side == 0 else (192, 128)
        self._out_payload = _HEADER if side == 0 else _HEADER + capacity
        self._in_payload = _HEADER + capacity if side == 0 else _HEADER
        self._out_seq = 0
        self._in_seq = 0
        self._spin_checks = _spin_checks_for(spin_us)
        self._watch_fd = watch_fd
        self._poll = select.poll()
        self._poll.register(self._my_efd, select.POLLIN)
        self._poll.register(watch_fd, watch_events)
        self.closed = False

    @classmethod
    def create(
        cls, watch_fd: int, watch_events: int, capacity: int = DEFAULT_CAPACITY, spin_us: float = DEFAULT_SPIN_US
    ) -> tuple[ShmChannel, list[int]]:
        """Side 0 of a new channel, and the fds to hand to the peer (which it then owns)."""
        mem_fd = os.memfd_create("flexos-channel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(mem_fd, _HEADER + 2 * capacity)
        # Sealed so that the peer cannot shrink it under us (a SIGBUS on our next access).
        fcntl.fcntl(mem_fd, fcntl.F_ADD_SEALS, _SEALS)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        efd0, efd1 = os.eventfd(0, flags), os.eventfd(0, flags)
        peer_fds = [os.dup(mem_fd), os.dup(efd0), os.dup(efd1)]
        return cls((mem_fd, efd0, efd1), 0, watch_fd, watch_events, capacity, spin_us), peer_fds

    # -- the hot path ---------------------------------------------------------------------------
    def exchange(self, frame: bytes) -> bytes:
        self.send(frame)
        return self.recv()

    def send(self, frame: bytes) -> None:
        mm = self._mm
        hdr = self._out_hdr
        size = len(frame)
        if size <= self._capacity:
            if _SEQ.unpack_from(mm, hdr + 8)[0] != self._out_seq:
                self._wait(hdr + 8, self._out_seq)
            start = self._out_payload
            mm[start : start + size] = frame
            _LEN_FLAGS.pack_into(mm, hdr + 16, size, 0)
            self._publish(hdr)
            return
        view = memoryview(frame)
        for pos in range(0, size, self._capacity):
            chunk = view[pos : pos + self._capacity]
            self._wait(hdr + 8, self._out_seq)
            start = self._out_payload
            mm[start : start + len(chunk)] = chunk
            more = _MORE if pos + len(chunk) < size else 0
            _LEN_FLAGS.pack_into(mm, hdr + 16, len(chunk), more)
            self._publish(hdr)

    def _publish(self, hdr: int) -> None:
        self._out_seq += 1
        _SEQ.pack_into(self._mm, hdr, self._out_seq)
        _fence_lock.acquire()
        _fence_lock.release()
        if _FLAG.unpack_from(self._mm, self._peer_sleep)[0]:
            os.eventfd_write(self._peer_efd, 1)

    def recv(self) -> bytes:
        mm = self._mm
        hdr = self._in_hdr
        parts = []
        while True:
            expected = self._in_seq + 1
            if _SEQ.unpack_from(mm, hdr)[0] != expected:
                self._wait(hdr, expected)
            size, flags = _LEN_FLAGS.unpack_from(mm, hdr + 16)
            if size > self._capacity or flags & ~_MORE:
                raise ProtocolError(f"corrupt channel header (length {size}, flags {flags})")
            start = self._in_payload
            data = mm[start : start + size]
            self._in_seq = expected
            _SEQ.pack_into(mm, hdr + 8, expected)
            if not flags & _MORE:
                if parts:
                    parts.append(data)
                    return b"".join(parts)
                return data
            parts.append(data)
            _fence_lock.acquire()
            _fence_lock.release()
            if _FLAG.unpack_from(mm, self._peer_sleep)[0]:
                os.eventfd_write(self._peer_efd, 1)

    def _wait(self, offset: int, value: int) -> None:
        mm = self._mm
        unpack = _SEQ.unpack_from
        for _ in range(self._spin_checks):
            if unpack(mm, offset)[0] == value:
                return
        self._block(offset, value)

    def _block(self, offset: int, value: int) -> None:
        mm = self._mm
        while True:
            _FLAG.pack_into(mm, self._my_sleep, 1)
            _fence_lock.acquire()
            _fence_lock.release()
            if _SEQ.unpack_from(mm, offset)[0] == value:
                _FLAG.pack_into(mm, self._my_sleep, 0)
                return
            for fd, events in self._poll.poll(_BLOCK_POLL_MS):
                if fd == self._watch_fd or events & select.POLLNVAL:
                    _FLAG.pack_into(mm, self._my_sleep, 0)
                    raise PeerGone()
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
            _FLAG.pack_into(mm, self._my_sleep, 0)
            if self.closed:
                raise PeerGone()
            if _SEQ.unpack_from(mm, offset)[0] == value:
                return

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in self._efds:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._mm.close()
        except BufferError:
            pass


class ShmTransport:
    """Shared-memory channels to one peer process, set up over a control socket.

    Either side may open a channel: it creates and seals the memory and two eventfds, and passes
    them over the SOCK_SEQPACKET control socket; the other side's accept loop starts a thread
    serving it. ``watch_fd`` becomes readable (a pidfd) or hangs up (the socket) when the peer
    dies, which wakes any blocked waiter.
    """

    def __init__(
        self,
        sock: socket.socket,
        watch_fd: int,
        watch_events: int,
        death: Callable[[], BaseException],
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        self._sock = sock
        self._watch = (watch_fd, watch_events)
        self._death = death
        self._spin_us = spin_us
        self._send_lock = threading.Lock()

    def open_channel(self) -> ShmChannel:
        channel, fds = ShmChannel.create(*self._watch, spin_us=self._spin_us)
        try:
            with self._send_lock:
                socket.send_fds(self._sock, [_OPEN], fds)
        except OSError:
            channel.close()
            raise PeerGone() from None
        finally:
            for fd in fds:
                os.close(fd)
        return channel

    def accept_loop(self, link: Any) -> None:
        """Serve channels the peer opens until it goes away; then mark the link closed."""
        try:
            while True:
                try:
                    message, fds, _flags, _addr = socket.recv_fds(self._sock, 64, 3)
                except OSError:
                    break
                if not message:
                    break
                try:
                    if message != _OPEN or len(fds) != 3:
                        raise ProtocolError("unexpected control message")
                    channel = ShmChannel(tuple(fds), 1, *self._watch, spin_us=self._spin_us)
                except (ProtocolError, OSError, ValueError):
                    for fd in fds:
                        try:
                            os.close(fd)
                        except OSError:
                            pass
                    continue
                threading.Thread(target=link.serve, args=(channel,), daemon=True, name="flexos-serve").start()
        finally:
            link.closed = True

    def death(self) -> BaseException:
        return self._death()

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
