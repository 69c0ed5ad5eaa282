"""Bulk buffers between the app and a process compartment: what a loan names, and its checks.

A bytes-like value of :data:`THRESHOLD` bytes or more crosses beside its frame instead of inside
it (:mod:`flexos.transports.bulk` moves the memory); the frame carries a LOAN record naming it.
Everything in a record and every descriptor that comes with one is the peer's word, checked here
before any byte of it is read: the record's fields, that an arena is a sealed memfd of the agreed
size, that a sealed buffer can no longer change (F_SEAL_WRITE, F_SEAL_SHRINK, F_SEAL_GROW) and is
exactly as long as its record says.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any

from flexos.errors import ProtocolError

#: Buffers at least this large cross beside the frame (below it, copying them inside the frame
#: costs less than a loan's bookkeeping).
THRESHOLD = 64 << 10

# kind, placement, offset (ARENA, ARENA_VIEW) or transfer id (SEALED, VIEW), length
_RECORD = struct.Struct("<BBxxxxxxQQ")
RECORD_SIZE = _RECORD.size
_TRANSFER = struct.Struct("<Q")  # what a SEALED buffer's descriptor travels with: its transfer id
# A receiver's RELEASE message: this tag, then the u64 offsets of the ARENA_VIEW slots it is done with.
RELEASE_TAG = b"R"
_OFFSET = struct.Struct("<Q")
MAX_RELEASES = 64  # offsets in one RELEASE message, at most
MAX_MESSAGE = len(RELEASE_TAG) + MAX_RELEASES * _OFFSET.size


class Kind:
    """The type a lent buffer arrives as (the sender's type)."""

    BYTES = 0
    BYTEARRAY = 1
    MEMORYVIEW = 2


class Placement:
    """Where a lent buffer's bytes are."""

    ARENA = 0  # in the sender's arena at an offset: the receiver copies them out as it decodes
    SEALED = 1  # in a sealed memfd of its own, passed beside the frame: the receiver copies it out
    VIEW = 2  # the same, lent to be viewed: a receiver under the ``view`` strategy maps it read-only
    # In the app's arena, lent to be viewed in place: the compartment (which cannot write that
    # arena) views it read-only, and the app keeps the slot until a RELEASE message frees it.
    ARENA_VIEW = 3


# The element formats a memoryview keeps across a gate (native single characters, which
# memoryview.cast accepts); a view of any other format arrives as unsigned bytes.
VIEW_FORMATS = frozenset("bBchHiIlLqQnNfd?")
MAX_VIEW_DIMENSIONS = 64  # memoryview's own limit
_DIMENSION = struct.Struct("<Q")

KIND_OF_TYPE = {bytes: Kind.BYTES, bytearray: Kind.BYTEARRAY, memoryview: Kind.MEMORYVIEW}
ARENA_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
BUFFER_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


@dataclass(frozen=True)
class Loan:
    kind: int
    placement: int
    where: int  # the arena offset, or the transfer id
    length: int


def encode_loan(loan: Loan) -> bytes:
    return _RECORD.pack(loan.kind, loan.placement, loan.where, loan.length)


def decode_loan(payload: bytes, arena_size: int) -> Loan:
    """The loan a LOAN payload names, every field checked (an ARENA loan must lie in the arena)."""
    if len(payload) != _RECORD.size:
        raise ProtocolError("malformed buffer loan")
    kind, placement, where, length = _RECORD.unpack(payload)
    if kind not in (Kind.BYTES, Kind.BYTEARRAY, Kind.MEMORYVIEW):
        raise ProtocolError(f"buffer loan of unknown kind {kind}")
    if placement in (Placement.ARENA, Placement.ARENA_VIEW):
        if where > arena_size or length > arena_size - where:
            raise ProtocolError(f"buffer loan [{where}, +{length}) lies outside the {arena_size}-byte arena")
    elif placement not in (Placement.SEALED, Placement.VIEW):
        raise ProtocolError(f"buffer loan of unknown placement {placement}")
    return Loan(kind, placement, where, length)


def encode_transfer(transfer: int) -> bytes:
    return _TRANSFER.pack(transfer)


def decode_transfer(message: bytes, fds: list[int], flags: int = 0) -> int:
    """The transfer id of a message that brings a sealed buffer's descriptor (exactly one: a
    message truncated on receipt, ``flags`` MSG_CTRUNC or MSG_TRUNC, had more than it may)."""
    if len(message) != _TRANSFER.size or len(fds) != 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
        raise ProtocolError("malformed buffer transfer message")
    return int(_TRANSFER.unpack(message)[0])


def encode_release(starts: list[int]) -> bytes:
    """The RELEASE message of up to :data:`MAX_RELEASES` ARENA_VIEW slots the receiver is done with."""
    return RELEASE_TAG + b"".join(_OFFSET.pack(start) for start in starts)


def is_release(message: bytes, fds: list[int]) -> bool:
    """Whether a message on the port's socket is meant as a RELEASE: the tag, and no descriptor
    (which every transfer brings); anything else must be a transfer."""
    return not fds and message.startswith(RELEASE_TAG)


def decode_release(message: bytes, fds: list[int], flags: int = 0) -> list[int]:
    """The slots a RELEASE message frees (one to :data:`MAX_RELEASES`)."""
    truncated = flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC)
    count, partial = divmod(len(message) - len(RELEASE_TAG), _OFFSET.size)
    if not is_release(message, fds) or not 1 <= count <= MAX_RELEASES or partial or truncated:
        raise ProtocolError("malformed buffer release message")
    return [start for (start,) in _OFFSET.iter_unpack(message[len(RELEASE_TAG) :])]


def check_arena(fd: int, size: int) -> None:
    """``fd`` is a memfd of ``size`` bytes that nobody can shrink (a read past its end would be a
    SIGBUS) or grow."""
    _check_memfd(fd, size, ARENA_SEALS, "arena")


def check_sealed_buffer(fd: int, length: int) -> None:
    """``fd`` is a memfd of exactly ``length`` bytes that nobody can write, shrink or grow any more
    (the sender's writable mappings are gone: the kernel refuses F_SEAL_WRITE while one exists)."""
    _check_memfd(fd, length, BUFFER_SEALS, "lent buffer")


def _check_memfd(fd: int, size: int, seals: int, what: str) -> None:
    try:
        info = os.fstat(fd)
        present = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # EINVAL for anything but a memfd (shmem)
    except OSError as exc:
        raise ProtocolError(f"{what} descriptor is not a memfd: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ProtocolError(f"{what} descriptor is not a regular memfd")
    if present & seals != seals:
        raise ProtocolError(f"{what} memfd is not sealed (seals {present:#x}, needed {seals:#x})")
    if info.st_size != size:
        raise ProtocolError(f"{what} memfd holds {info.st_size} bytes, not the {size} agreed")


def view_format(view: memoryview) -> tuple[str, list[int]]:
    """The format and shape a memoryview crosses with: its own, or unsigned bytes."""
    if view.format in VIEW_FORMATS and view.ndim >= 1:
        return view.format, list(view.shape or ())
    return "B", [view.nbytes]


def view_shape(view: memoryview) -> bytes:
    """A lent memoryview's format and shape, after its record: format, ndim, then u64 dimensions."""
    fmt, shape = view_format(view)
    return fmt.encode() + bytes([len(shape)]) + b"".join(_DIMENSION.pack(n) for n in shape)


def decode_view_shape(tail: bytes, loan: Loan) -> tuple[str, list[int]]:
    """The format and shape after a lent memoryview's record (none for bytes and bytearray)."""
    if loan.kind != Kind.MEMORYVIEW:
        if tail:
            raise ProtocolError("buffer loan has trailing bytes")
        return "B", [loan.length]
    if len(tail) < 2 or len(tail) != 2 + tail[1] * _DIMENSION.size:
        raise ProtocolError("malformed memoryview loan")
    fmt = chr(tail[0])
    shape = [_DIMENSION.unpack_from(tail, 2 + i * _DIMENSION.size)[0] for i in range(tail[1])]
    check_view_format(fmt, shape, loan.length)
    return fmt, shape


def check_view_format(fmt: object, shape: object, length: int) -> None:
    """A format and shape the peer sent describe ``length`` bytes exactly (ProtocolError if not)."""
    if type(fmt) is not str or fmt not in VIEW_FORMATS:
        raise ProtocolError("memoryview has a bad format")
    if (
        type(shape) is not list
        or not 1 <= len(shape) <= MAX_VIEW_DIMENSIONS
        or any(type(n) is not int or n < 0 for n in shape)
    ):
        raise ProtocolError("memoryview has a bad shape")
    count = 1
    for n in shape:
        count *= n
    if count * struct.calcsize(fmt) != length:
        raise ProtocolError("memoryview's shape and format do not match its data")


def shaped_view(view: memoryview, shape: tuple[str, list[int]]) -> memoryview:
    """``view`` (of unsigned bytes, checked by :func:`check_view_format`) as that format and shape."""
    fmt, dimensions = shape
    if fmt == "B" and len(dimensions) == 1:
        return view
    cast: Any = view.cast  # typeshed types cast by a literal format
    return cast(fmt, dimensions)
