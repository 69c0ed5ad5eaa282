"""Bulk buffers beside the frames, between the app and a process compartment (FlexOS's shared data).

Frames carry small values; a bytes-like value of :data:`~flexos.wire.bulk.THRESHOLD` bytes or
more crosses through shared memory instead, with one copy on each side at most:

- **arenas** (the default, ``copy``): each direction has one memfd arena, created by the app at
  boot, sealed against shrinking and growing. The sender copies the buffer into a free slot of
  its arena (pre-faulted after first use: the fastest copy there is) and sends its offset; the
  receiver copies it out into an object of its own while it decodes the frame, so nothing it
  checks or keeps is memory the sender can still write. The compartment maps the app's arena
  from a read-only descriptor, and that arena is sealed against writes and new writable
  mappings once the app has mapped it: the compartment cannot write a byte of it, not even
  through a read-write reopening of its descriptor. A channel is a strict alternation, so the
  peer's next frame on it proves it decoded ours: the sending thread frees its slots then
  (:meth:`BulkPort.received`; a call it makes on another channel meanwhile proves nothing).
- **sealed buffers** (the ``view`` sharing strategy, and any buffer that does not fit the arena):
  the sender writes the buffer into a memfd of its own, seals it against writing, shrinking and
  growing, and passes the descriptor over the port's socket before the frame; the receiver checks
  the seals and either maps it read-only (a zero-copy, immutable view, unmapped when the view is
  dropped) or copies it out.

The socket is read only by a decoding thread, never waited on: the descriptor was queued before
the frame that names it, so a loan whose descriptor is not there is the peer's lie.
"""

from __future__ import annotations

import bisect
import fcntl
import mmap
import os
import socket
import sys
import threading
from typing import Any

from flexos.errors import GateError, ProtocolError
from flexos.transports import ReplyTooLarge
from flexos.wire import bulk
from flexos.wire.bulk import BUFFER_SEALS, KIND_OF_TYPE, Kind, Loan, Placement

#: Each direction's arena, in bytes of address space (pages are taken as they are first written,
#: and kept: a second transfer of the same size writes pre-faulted memory).
DEFAULT_ARENA = 256 << 20
_ALIGN = 4096
_UNCLAIMED = 64  # descriptors of sealed buffers received but not yet named by a frame, at most
_TRANSFER_SIZE = 8
# A view's mapping holds no descriptor (Python 3.13+): with one each, many kept views would run out of them.
_UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}


def open_port(
    size: int = DEFAULT_ARENA, *, views: bool = False, max_frame: int | None = None
) -> tuple[BulkPort, list[int]]:
    """(The app) a new port, and the compartment's descriptors for its side: [socket, the arena
    it writes, the arena it reads]. The compartment's copy of the app's arena is read-only, and the
    arena is sealed against writes and new writable mappings once the app has mapped it (a
    read-only memfd descriptor can be reopened read-write through /proc/self/fd)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    app_arena = os.memfd_create("flexos-arena-app", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    compartment_arena = os.memfd_create("flexos-arena-compartment", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    for fd in (app_arena, compartment_arena):
        os.ftruncate(fd, size)
    written = mmap.mmap(app_arena, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    fcntl.fcntl(app_arena, fcntl.F_ADD_SEALS, bulk.ARENA_SEALS | fcntl.F_SEAL_FUTURE_WRITE)
    fcntl.fcntl(compartment_arena, fcntl.F_ADD_SEALS, bulk.ARENA_SEALS)
    app_arena_read_only = os.open(f"/proc/self/fd/{app_arena}", os.O_RDONLY | os.O_CLOEXEC)
    their_fds = [theirs.detach(), os.dup(compartment_arena), app_arena_read_only]
    port = BulkPort([ours.detach(), app_arena, compartment_arena], views=views, max_frame=max_frame, written=written)
    return port, their_fds


class BulkPort:
    """One side of the bulk buffers to one peer: ``fds`` = [socket, arena we write, arena we read]
    (this object owns them). ``views``: the ``view`` sharing strategy, both ways (we lend sealed
    buffers to be viewed, and view those the peer lends so). ``max_frame`` bounds the bytes one
    frame of the peer's may make us copy or map. ``written``: our arena's writable mapping, made
    before the arena was sealed against new ones (the app's side, :func:`open_port`)."""

    def __init__(
        self,
        fds: list[int],
        *,
        views: bool = False,
        max_frame: int | None = None,
        written: mmap.mmap | None = None,
    ) -> None:
        sock_fd, out_fd, in_fd = fds
        self._sock = socket.socket(fileno=sock_fd)
        self._sock.setblocking(False)
        try:
            out_size, in_size = os.fstat(out_fd).st_size, os.fstat(in_fd).st_size
            bulk.check_arena(out_fd, out_size)
            bulk.check_arena(in_fd, in_size)
            if written is None:
                written = mmap.mmap(out_fd, out_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._out = written
            self._in = mmap.mmap(in_fd, in_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(out_fd)
            os.close(in_fd)
        self._in_size = in_size
        self._max_frame = max_frame
        self.views = views
        self._lock = threading.Lock()
        self._starts: list[int] = []  # slots in use in our arena: sorted starts, and their ends
        self._ends: list[int] = []
        # Slots lent and not freed yet, over every thread: while none are, a frame's arrival
        # has nothing to free, and the gates skip received() on their hot paths.
        self.lent_slots = 0
        self._local = threading.local()
        self._transfers = 0
        self._unclaimed: dict[int, int] = {}
        self._claim_lock = threading.Lock()

    # -- sending ----------------------------------------------------------------------------------
    def lend(self, buffer: bytes | bytearray | memoryview) -> bytes:
        """The LOAN record of ``buffer``, whose bytes are now in our arena or a sealed memfd."""
        kind = KIND_OF_TYPE[type(buffer)]
        view = memoryview(buffer)
        shape = bulk.view_shape(view) if kind == Kind.MEMORYVIEW else b""
        data = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        size = data.nbytes
        start = None if self.views else self._allocate(size)
        if start is None:
            placement = Placement.VIEW if self.views else Placement.SEALED
            return bulk.encode_loan(Loan(kind, placement, self._send_sealed(data), size)) + shape
        self._out[start : start + size] = data
        pending = self._local.__dict__.setdefault("pending", [])
        pending.append(start)
        return bulk.encode_loan(Loan(kind, Placement.ARENA, start, size)) + shape

    def _allocate(self, size: int) -> int | None:
        """The start of a free slot of ``size`` bytes in our arena (first fit), or None if full."""
        rounded = -(-max(size, 1) // _ALIGN) * _ALIGN
        with self._lock:
            starts, ends = self._starts, self._ends
            previous_end = 0
            for index, start in enumerate(starts):
                if start - previous_end >= rounded:
                    starts.insert(index, previous_end)
                    ends.insert(index, previous_end + rounded)
                    self.lent_slots += 1
                    return previous_end
                previous_end = ends[index]
            if len(self._out) - previous_end >= rounded:
                starts.append(previous_end)
                ends.append(previous_end + rounded)
                self.lent_slots += 1
                return previous_end
        return None

    def _send_sealed(self, data: memoryview) -> int:
        fd = os.memfd_create("flexos-buffer", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            written = 0
            while written < data.nbytes:
                written += os.write(fd, data[written:])
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, BUFFER_SEALS | fcntl.F_SEAL_SEAL)
            with self._lock:
                self._transfers += 1
                transfer = self._transfers
            try:
                socket.send_fds(self._sock, [bulk.encode_transfer(transfer)], [fd])
            except BlockingIOError:
                raise GateError("the peer does not take the buffers it is sent (its socket is full)") from None
            except OSError as exc:
                raise GateError(f"a large buffer could not be sent: {exc}") from None
            return transfer
        finally:
            os.close(fd)

    def received(self, frame_size: int = 0) -> None:
        """This thread got the peer's next frame on its channel (``frame_size`` bytes, which count
        against the bound with the buffers it lends): the peer decoded (copied out) everything
        this thread lent from the arena before, so its slots are free again."""
        local = self._local.__dict__
        pending = local.get("pending")
        if pending:
            self.release(pending)
            pending.clear()
        local["budget"] = None if self._max_frame is None else self._max_frame - frame_size

    def bound(self, frame_size: int) -> None:
        """The frame of ``frame_size`` bytes this thread is about to decode may lend buffers up
        to the bound, less its own size (what :meth:`received` sets, without freeing)."""
        self._local.budget = None if self._max_frame is None else self._max_frame - frame_size

    def set_aside(self) -> list[int]:
        """The slots this thread lent on its channel, out of reach of :meth:`received` while it
        makes calls on other channels (their frames prove nothing about this one's)."""
        local = self._local.__dict__
        lent: list[int] = local.get("pending") or []
        local["pending"] = []
        return lent

    def restore(self, lent: list[int]) -> None:
        """Slots :meth:`set_aside` took, waiting again for this thread's next frame."""
        self._local.__dict__.setdefault("pending", []).extend(lent)

    def release(self, starts: list[int]) -> None:
        with self._lock:
            for start in starts:
                index = bisect.bisect_left(self._starts, start)
                if index < len(self._starts) and self._starts[index] == start:
                    del self._starts[index]
                    del self._ends[index]
                    self.lent_slots -= 1

    def arena_in_use(self) -> int:
        """Bytes of our arena held by slots the peer has not decoded yet."""
        with self._lock:
            return sum(end - start for start, end in zip(self._starts, self._ends, strict=True))

    # -- receiving --------------------------------------------------------------------------------
    def borrow(self, payload: bytes) -> Any:
        """The value a LOAN record of the peer's names: our own copy, or, under the ``view``
        strategy, a read-only view of an immutable buffer; ProtocolError if the record lies."""
        loan = bulk.decode_loan(payload[: bulk.RECORD_SIZE], self._in_size)
        shape = bulk.decode_view_shape(payload[bulk.RECORD_SIZE :], loan)
        budget = self._local.__dict__.get("budget", self._max_frame)
        if budget is not None:
            if loan.length > budget:
                raise ReplyTooLarge(f"a frame lent buffers over the max_reply of {self._max_frame} bytes")
            self._local.budget = budget - loan.length
        if loan.placement == Placement.ARENA:
            start, end = loan.where, loan.where + loan.length
            if loan.kind == Kind.BYTEARRAY:
                with memoryview(self._in) as whole:
                    return bytearray(whole[start:end])
            data = self._in[start:end]  # bytes: the copy
            return data if loan.kind == Kind.BYTES else bulk.shaped_view(memoryview(data), shape)
        fd = self._claim(loan.where)
        try:
            bulk.check_sealed_buffer(fd, loan.length)
            if loan.placement == Placement.VIEW and self.views and loan.length:
                mapped = mmap.mmap(fd, loan.length, mmap.MAP_SHARED, mmap.PROT_READ, **_UNTRACKED)
                return bulk.shaped_view(memoryview(mapped), shape)
            copied = _read_all(fd, loan.length)
        finally:
            os.close(fd)
        if loan.kind == Kind.BYTES:
            return copied
        if loan.kind == Kind.BYTEARRAY:
            return bytearray(copied)
        return bulk.shaped_view(memoryview(copied), shape)

    def _claim(self, transfer: int) -> int:
        """The descriptor that came with sealed buffer ``transfer`` (already queued: never waits)."""
        with self._claim_lock:
            unclaimed = self._unclaimed
            while transfer not in unclaimed:
                try:
                    message, fds, flags, _addr = socket.recv_fds(self._sock, _TRANSFER_SIZE + 1, 1)
                except BlockingIOError:
                    raise ProtocolError(
                        f"peer named sealed buffer {transfer}, whose descriptor it never sent"
                    ) from None
                try:
                    number = bulk.decode_transfer(message, fds, flags)
                except ProtocolError:
                    for fd in fds:
                        os.close(fd)
                    raise
                if number in unclaimed or len(unclaimed) >= _UNCLAIMED:
                    os.close(fds[0])
                    raise ProtocolError("peer sent descriptors of buffers it never named")
                unclaimed[number] = fds[0]
            return unclaimed.pop(transfer)

    def unclaimed(self) -> int:
        """Descriptors received and not yet named by a frame (they stay open until then)."""
        return len(self._unclaimed)

    def close(self) -> None:
        self._sock.close()
        with self._claim_lock:
            for fd in self._unclaimed.values():
                os.close(fd)
            self._unclaimed.clear()
        for mapping in (self._out, self._in):
            try:
                mapping.close()
            except BufferError:  # a view still holds it: it goes with the last view
                pass


def _read_all(fd: int, length: int) -> bytes:
    data = os.pread(fd, length, 0)
    if len(data) == length:
        return data
    parts = [data]
    done = len(data)
    while done < length:
        part = os.pread(fd, length - done, done)
        if not part:
            raise ProtocolError("lent buffer ended early")
        parts.append(part)
        done += len(part)
    return b"".join(parts)
