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
- **views** (the ``view`` sharing strategy): the receiver gets a read-only ``memoryview`` and no
  copy of its own. App → compartment, in place: the app copies the buffer into a slot of its
  arena, which the compartment cannot write, and keeps that slot (placement ARENA_VIEW) until
  the compartment's last view of it is dropped and a RELEASE message says so; a peer that
  releases what it was not lent gets copies from then on. Compartment → app: the compartment
  can write its own arena, so the app copies what it lends into memory of its own, pre-faulted
  after first use and reused once the view is dropped: what the app checked cannot change.
- **sealed buffers** (a buffer that does not fit the arena, under either strategy): the sender
  writes the buffer into a memfd of its own, seals it against writing, shrinking and growing, and
  passes the descriptor over the port's socket before the frame; the receiver checks the seals
  and either maps it read-only (under ``view``: an immutable view, unmapped when it is dropped)
  or copies it out.

The socket is never waited on: a descriptor is queued before the frame that names it, so a loan
whose descriptor is not there is the peer's lie; RELEASE messages are taken when the sender next
lends a buffer (or counts its arena).
"""

from __future__ import annotations

import bisect
import fcntl
import inspect
import mmap
import os
import socket
import sys
import threading
from collections import deque
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
# A view's mapping holds no descriptor (Python 3.13+): with one each, many kept views would run out of them.
_UNTRACKED: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}
# A view whose dropping frees its slot needs a Python buffer exporter (PEP 688, Python 3.12+);
# before, views are of sealed buffers (lent) and of fresh copies (received) only.
_SLOT_VIEWS = sys.version_info >= (3, 12)


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
            # An arena sealed against new writable mappings is the app's (open_port): the
            # compartment cannot write it, so the app may lend slots of it to be viewed in place.
            self._lends_in_place = views and _SLOT_VIEWS and _future_write_sealed(out_fd)
            self._views_in_place = views and _SLOT_VIEWS and _future_write_sealed(in_fd)
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
        self._arena = _Slots(len(self._out))
        # Slots lent and not freed yet, over every thread, other than those lent to be viewed in
        # place: while none are, a frame's arrival has nothing to free, and the gates skip
        # received() on their hot paths.
        self.lent_slots = 0
        self._viewed: set[int] = set()  # our slots the peer views in place, until it releases them
        self._copies: tuple[mmap.mmap, _Slots] | None = None  # (receiving, views) where views are copied to
        # A dropped view's slot, noted without a lock (the garbage collector may drop a view in
        # any code of this thread, this port's own included): the peer's slots we viewed in
        # place, to send back in RELEASE messages, and the slots of our copies, to free.
        self._released: deque[int] = deque()
        self._freed_copies: deque[int] = deque()
        self._send_lock = threading.Lock()
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
        if self._released:
            self._send_releases()
        if self._lends_in_place:
            self._collect_releases()
            with self._lock:
                start = self._arena.take(size)
                if start is not None:
                    self._viewed.add(start)
            if start is not None:
                self._out[start : start + size] = data
                return bulk.encode_loan(Loan(kind, Placement.ARENA_VIEW, start, size)) + shape
        else:
            with self._lock:
                start = self._arena.take(size)
                if start is not None:
                    self.lent_slots += 1
            if start is not None:
                self._out[start : start + size] = data
                self._local.__dict__.setdefault("pending", []).append(start)
                return bulk.encode_loan(Loan(kind, Placement.ARENA, start, size)) + shape
        placement = Placement.VIEW if self.views else Placement.SEALED
        return bulk.encode_loan(Loan(kind, placement, self._send_sealed(data), size)) + shape

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
                if self._arena.free(start):
                    self.lent_slots -= 1

    def arena_in_use(self) -> int:
        """Bytes of our arena held by slots the peer has not decoded, or still views, yet."""
        if self._viewed:
            self._collect_releases()
        with self._lock:
            return self._arena.in_use()

    def _collect_releases(self) -> None:
        """Free the slots the peer's RELEASE messages name (queued on the socket, never waited for).
        A peer that releases what it was not lent is lent nothing in place any more (copies need
        no word of its), and this is its ProtocolError."""
        with self._claim_lock:
            try:
                while self._take_message():
                    pass
            except ProtocolError:
                self._lends_in_place = False
                raise

    def _take_message(self) -> bool:
        """Take one message from the socket, if one is there: a RELEASE is applied, a sealed
        buffer's descriptor kept until a frame names it. ProtocolError if the peer lies."""
        try:
            message, fds, flags, _addr = socket.recv_fds(self._sock, bulk.MAX_MESSAGE + 1, 1)
        except BlockingIOError:
            return False
        if bulk.is_release(message, fds):
            starts = bulk.decode_release(message, fds, flags)
            with self._lock:
                if not set(starts) <= self._viewed or len(set(starts)) != len(starts):
                    raise ProtocolError("peer released a buffer it was not lent to view")
                for start in starts:
                    self._viewed.discard(start)
                    self._arena.free(start)
            return True
        try:
            number = bulk.decode_transfer(message, fds, flags)
        except ProtocolError:
            for fd in fds:
                os.close(fd)
            raise
        if number in self._unclaimed or len(self._unclaimed) >= _UNCLAIMED:
            os.close(fds[0])
            raise ProtocolError("peer sent descriptors of buffers it never named")
        self._unclaimed[number] = fds[0]
        return True

    # -- receiving --------------------------------------------------------------------------------
    def borrow(self, payload: bytes) -> Any:
        """The value a LOAN record of the peer's names: our own copy, or, under the ``view``
        strategy, a read-only view of an immutable buffer; ProtocolError if the record lies."""
        if self._released:
            self._send_releases()
        loan = bulk.decode_loan(payload[: bulk.RECORD_SIZE], self._in_size)
        shape = bulk.decode_view_shape(payload[bulk.RECORD_SIZE :], loan)
        budget = self._local.__dict__.get("budget", self._max_frame)
        if budget is not None:
            if loan.length > budget:
                raise ReplyTooLarge(f"a frame lent buffers over the max_reply of {self._max_frame} bytes")
            self._local.budget = budget - loan.length
        if loan.placement == Placement.ARENA_VIEW:
            if not self._views_in_place:
                raise ProtocolError("peer lent a buffer to be viewed in an arena it can write")
            return bulk.shaped_view(memoryview(_Viewed(self, loan.where, loan.length)), shape)
        if loan.placement == Placement.ARENA:
            start, end = loan.where, loan.where + loan.length
            if self.views:
                return bulk.shaped_view(self._copy_to_view(start, end), shape)
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
            while transfer not in self._unclaimed:
                if not self._take_message():
                    raise ProtocolError(f"peer named sealed buffer {transfer}, whose descriptor it never sent")
            return self._unclaimed.pop(transfer)

    def _copy_to_view(self, start: int, end: int) -> memoryview:
        """A read-only view of our own copy of the peer's arena bytes [start, end): in a pre-faulted
        mapping of ours, reused once the view is dropped (a fresh object when that is full)."""
        if not _SLOT_VIEWS:
            with memoryview(self._in) as whole:
                return memoryview(whole[start:end].tobytes())
        if self._copies is None:
            with self._lock:
                if self._copies is None:
                    self._copies = (mmap.mmap(-1, self._in_size, mmap.MAP_PRIVATE), _Slots(self._in_size))
        copies, slots = self._copies
        length = end - start
        with self._lock:
            while self._freed_copies:
                slots.free(self._freed_copies.popleft())
            at = slots.take(length)
        with memoryview(self._in) as whole:
            if at is None:
                return memoryview(whole[start:end].tobytes())
            with memoryview(copies) as ours:
                ours[at : at + length] = whole[start:end]
        return memoryview(_Viewed(self, at, length, copies))

    def copies_in_use(self) -> int:
        """Bytes of our copies (of the peer's arena, under ``view``) that views still hold."""
        if self._copies is None:
            return 0
        with self._lock:
            while self._freed_copies:
                self._copies[1].free(self._freed_copies.popleft())
            return self._copies[1].in_use()

    def _done_viewing(self, start: int, copies: mmap.mmap | None) -> None:
        """A view made by :meth:`borrow` was dropped: free our copy's slot (at the next copy), or
        tell the peer it may reuse its arena slot (a RELEASE message, now if no other thread is
        sending; else with the next one)."""
        if copies is None:
            self._released.append(start)
            self._send_releases()
        elif self._copies is not None and self._copies[0] is copies:
            self._freed_copies.append(start)

    def _send_releases(self) -> None:
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            released = self._released
            while released:
                batch = [released.popleft() for _ in range(min(len(released), bulk.MAX_RELEASES))]
                try:
                    self._sock.sendmsg([bulk.encode_release(batch)])
                except BlockingIOError:  # the peer has not read the last ones: with the next view
                    released.extendleft(reversed(batch))
                    return
                except OSError:  # the port is closed: the peer's arena went with it
                    released.clear()
                    return
        finally:
            self._send_lock.release()

    def unclaimed(self) -> int:
        """Descriptors received and not yet named by a frame (they stay open until then)."""
        return len(self._unclaimed)

    def close(self) -> None:
        self._sock.close()
        with self._claim_lock:
            for fd in self._unclaimed.values():
                os.close(fd)
            self._unclaimed.clear()
        for mapping in (self._out, self._in, *(self._copies or ())[:1]):
            try:
                mapping.close()
            except BufferError:  # a view still holds it: it goes with the last view
                pass


class _Slots:
    """Which page-aligned slots of a region of ``size`` bytes are taken (first fit); the caller
    holds the port's lock."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._starts: list[int] = []  # sorted starts, and their ends
        self._ends: list[int] = []

    def take(self, size: int) -> int | None:
        """The start of a free slot of ``size`` bytes, now taken, or None if none is free."""
        rounded = -(-max(size, 1) // _ALIGN) * _ALIGN
        starts, ends = self._starts, self._ends
        previous_end = 0
        for index, start in enumerate(starts):
            if start - previous_end >= rounded:
                starts.insert(index, previous_end)
                ends.insert(index, previous_end + rounded)
                return previous_end
            previous_end = ends[index]
        if self._size - previous_end >= rounded:
            starts.append(previous_end)
            ends.append(previous_end + rounded)
            return previous_end
        return None

    def free(self, start: int) -> bool:
        """Free the slot at ``start``; False if none starts there."""
        index = bisect.bisect_left(self._starts, start)
        if index < len(self._starts) and self._starts[index] == start:
            del self._starts[index]
            del self._ends[index]
            return True
        return False

    def in_use(self) -> int:
        return sum(end - start for start, end in zip(self._starts, self._ends, strict=True))


class _Viewed:
    """What a view a port hands out is a view of: ``length`` bytes at ``start`` of the peer's
    arena (viewed in place) or of ``copies``, our own copy. Exported read-only only; once the last
    export is released the slot is freed (:meth:`BulkPort._done_viewing`) and it exports no more."""

    __slots__ = ("_copies", "_exports", "_length", "_port", "_start")

    def __init__(self, port: BulkPort, start: int, length: int, copies: mmap.mmap | None = None) -> None:
        self._port: BulkPort | None = port
        self._start = start
        self._length = length
        self._copies = copies
        self._exports = 0

    def __buffer__(self, flags: int) -> memoryview:
        port = self._port
        if port is None:
            raise BufferError("this buffer was released")
        if flags & inspect.BufferFlags.WRITABLE:
            raise BufferError("a viewed buffer is read-only")
        region = port._in if self._copies is None else self._copies
        with memoryview(region) as whole:
            view = whole[self._start : self._start + self._length].toreadonly()
        self._exports += 1
        return view

    def __release_buffer__(self, view: memoryview) -> None:
        view.release()
        self._exports -= 1
        if self._exports == 0 and self._port is not None:
            port, self._port = self._port, None
            port._done_viewing(self._start, self._copies)


def _future_write_sealed(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_FUTURE_WRITE)


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
