"""The bulk path's record format and checks (flexos/wire/bulk.py), and a BulkPort pair in one
process (flexos/transports/bulk.py), on real memfds, seals and sockets: the cases a compartment
cannot reach through a gate, and the bounds exactly."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flexos.errors import GateError, ProtocolError
from flexos.transports import ReplyTooLarge
from flexos.transports.bulk import _UNCLAIMED, BulkPort, open_port
from flexos.wire import bulk
from flexos.wire.bulk import THRESHOLD, Kind, Loan, Placement

ARENA = 1 << 20
SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _memfd(data: bytes, seals: int = 0) -> int:
    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


@pytest.fixture
def ports() -> Iterator[tuple[BulkPort, BulkPort]]:
    """The app's port and the compartment's, over a 1 MiB arena each way."""
    app, theirs = open_port(ARENA)
    compartment = BulkPort(theirs)
    yield app, compartment
    app.close()
    compartment.close()


# -- records --------------------------------------------------------------------------------------


IN_ARENA = [Placement.ARENA, Placement.ARENA_VIEW]


@pytest.mark.parametrize("placement", IN_ARENA)
@pytest.mark.parametrize(("where", "length"), [(0, 0), (0, ARENA), (ARENA, 0), (ARENA - 1, 1), (4096, ARENA - 4096)])
def test_an_arena_loan_inside_the_arena_decodes(where: int, length: int, placement: int) -> None:
    loan = Loan(Kind.BYTEARRAY, placement, where, length)
    assert bulk.decode_loan(bulk.encode_loan(loan), ARENA) == loan


@pytest.mark.parametrize("placement", IN_ARENA)
@pytest.mark.parametrize(
    ("where", "length"), [(ARENA + 1, 0), (ARENA, 1), (ARENA - 1, 2), (0, ARENA + 1), (2**64 - 1, 2), (2, 2**64 - 1)]
)
def test_an_arena_loan_past_the_end_is_refused(where: int, length: int, placement: int) -> None:
    with pytest.raises(ProtocolError, match="outside the 1048576-byte arena"):
        bulk.decode_loan(bulk.encode_loan(Loan(Kind.BYTES, placement, where, length)), ARENA)


def test_a_sealed_loan_names_a_transfer_not_an_offset() -> None:
    loan = Loan(Kind.MEMORYVIEW, Placement.SEALED, 2**64 - 1, 2**64 - 1)
    assert bulk.decode_loan(bulk.encode_loan(loan), ARENA) == loan  # its length is checked on its memfd


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (bytes(bulk.RECORD_SIZE - 1), "malformed"),
        (bytes(bulk.RECORD_SIZE + 1), "malformed"),
        (bytes([3]) + bytes(bulk.RECORD_SIZE - 1), "unknown kind 3"),
        (bytes([0, 4]) + bytes(bulk.RECORD_SIZE - 2), "unknown placement 4"),
    ],
)
def test_a_malformed_record_is_refused(payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        bulk.decode_loan(payload, ARENA)


def test_a_transfer_message_is_exactly_one_id_and_one_descriptor() -> None:
    assert bulk.decode_transfer(bulk.encode_transfer(7), [3]) == 7
    for message, fds, flags in [
        (bulk.encode_transfer(7), [], 0),
        (bulk.encode_transfer(7), [3, 4], 0),
        (bulk.encode_transfer(7) + b"x", [3], 0),
        (bulk.encode_transfer(7), [3], socket.MSG_CTRUNC),  # more descriptors came than were taken
        (bulk.encode_transfer(7), [3], socket.MSG_TRUNC),
    ]:
        with pytest.raises(ProtocolError, match="malformed buffer transfer message"):
            bulk.decode_transfer(message, fds, flags)


def test_a_release_message_is_the_tag_and_one_to_max_releases_offsets() -> None:
    starts = [0, 4096, 2**64 - 4096]
    message = bulk.encode_release(starts)
    assert bulk.is_release(message, []) and bulk.decode_release(message, []) == starts
    most = bulk.encode_release(list(range(bulk.MAX_RELEASES)))
    assert len(most) == bulk.MAX_MESSAGE and bulk.decode_release(most, []) == list(range(bulk.MAX_RELEASES))
    # A transfer whose id begins with the tag's byte is still a transfer: it brings a descriptor.
    assert not bulk.is_release(bulk.encode_transfer(ord("R")), [3])
    for malformed, flags in [
        (bulk.RELEASE_TAG, 0),
        (bulk.RELEASE_TAG + bytes(9), 0),
        (bulk.encode_release(list(range(bulk.MAX_RELEASES + 1))), 0),
        (message, socket.MSG_TRUNC),
    ]:
        with pytest.raises(ProtocolError, match="malformed buffer release message"):
            bulk.decode_release(malformed, [], flags)


@pytest.mark.parametrize(
    "view",
    [
        memoryview(bytes(THRESHOLD)),
        memoryview(bytes(THRESHOLD)).cast("d"),
        memoryview(bytes(THRESHOLD)).cast("i", [64, 256]),
        memoryview(bytes(THRESHOLD)).cast("B", [2] * 16),
    ],
)
def test_a_view_shape_round_trips(view: memoryview) -> None:
    loan = Loan(Kind.MEMORYVIEW, Placement.ARENA, 0, view.nbytes)
    shape = bulk.decode_view_shape(bulk.view_shape(view), loan)
    shaped = bulk.shaped_view(memoryview(view.tobytes()), shape)
    assert (shaped.format, shaped.shape, shaped.tolist()) == (view.format, view.shape, view.tolist())


@pytest.mark.parametrize(
    ("fmt", "shape", "error"),
    [
        ("<i", [16], "bad format"),
        (b"B", [16], "bad format"),
        ("B", [], "bad shape"),
        ("B", [1] * 65 + [16], "bad shape"),
        ("B", [-16], "bad shape"),
        ("B", (16,), "bad shape"),
        ("B", [True] * 16, "bad shape"),
        ("B", [15], "do not match"),
        ("q", [16], "do not match"),
    ],
)
def test_a_view_format_must_describe_the_length_exactly(fmt: object, shape: object, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        bulk.check_view_format(fmt, shape, 16)


def test_a_bytes_loan_has_no_view_tail() -> None:
    with pytest.raises(ProtocolError, match="trailing bytes"):
        bulk.decode_view_shape(b"B\x00", Loan(Kind.BYTES, Placement.ARENA, 0, 16))


# -- the checks on descriptors --------------------------------------------------------------------


def test_check_sealed_buffer_takes_only_a_memfd_sealed_as_required(tmp_path: Path) -> None:
    data = b"\x11" * 4096
    sealed = _memfd(data, SEALS)
    bulk.check_sealed_buffer(sealed, len(data))
    with pytest.raises(ProtocolError, match="holds 4096 bytes, not the 4097 agreed"):
        bulk.check_sealed_buffer(sealed, len(data) + 1)
    os.close(sealed)
    for seals in (0, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW):
        fd = _memfd(data, seals)
        with pytest.raises(ProtocolError, match="lent buffer memfd is not sealed"):
            bulk.check_sealed_buffer(fd, len(data))
        os.close(fd)
    read_end, write_end = os.pipe()
    (tmp_path / "plain").write_bytes(data)
    plain = os.open(tmp_path / "plain", os.O_RDONLY)
    for fd in (read_end, plain):
        with pytest.raises(ProtocolError, match="lent buffer descriptor is not a memfd"):
            bulk.check_sealed_buffer(fd, len(data))
    for fd in (read_end, write_end, plain):
        os.close(fd)


def test_future_write_is_not_enough_a_mapping_made_before_it_still_writes() -> None:
    """Why the check wants F_SEAL_WRITE: under F_SEAL_FUTURE_WRITE the sender's mapping writes on."""
    fd = _memfd(b"\x11" * 4096)
    mapping = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    mapping[0] = 0x22
    assert os.pread(fd, 1, 0) == b"\x22"
    with pytest.raises(ProtocolError, match="not sealed"):
        bulk.check_sealed_buffer(fd, 4096)
    with pytest.raises(OSError):  # nor can it seal against writing while that mapping exists
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    mapping.close()
    os.close(fd)


def test_check_arena_wants_the_agreed_size_and_no_resizing() -> None:
    fd = _memfd(b"", 0)
    os.ftruncate(fd, ARENA)
    with pytest.raises(ProtocolError, match="arena memfd is not sealed"):
        bulk.check_arena(fd, ARENA)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, bulk.ARENA_SEALS)
    bulk.check_arena(fd, ARENA)
    with pytest.raises(ProtocolError, match="not the 2097152 agreed"):
        bulk.check_arena(fd, 2 * ARENA)
    os.close(fd)


# -- the port's arenas ----------------------------------------------------------------------------


def test_the_compartments_copy_of_the_apps_arena_cannot_be_written_even_reopened() -> None:
    app, theirs = open_port(ARENA)
    _sock, own, apps = theirs
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(apps, ARENA, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(OSError):
            os.pwrite(apps, b"x", 0)
        reopened = os.open(f"/proc/self/fd/{apps}", os.O_RDWR)
        for attempt in (
            lambda: mmap.mmap(reopened, ARENA, mmap.MAP_SHARED, mmap.PROT_WRITE),
            lambda: os.pwrite(reopened, b"x", 0),
            lambda: os.ftruncate(reopened, ARENA // 2),
            lambda: os.ftruncate(reopened, ARENA * 2),
            lambda: fcntl.fcntl(reopened, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE),
        ):
            with pytest.raises(PermissionError):
                attempt()
        os.close(reopened)
        for attempt in (lambda: os.ftruncate(own, ARENA // 2), lambda: os.ftruncate(own, ARENA * 2)):
            with pytest.raises(PermissionError):
                attempt()
        record = app.lend(b"\x5a" * THRESHOLD)  # the app's own mapping still writes
        assert os.pread(apps, 4, bulk.decode_loan(record, ARENA).where) == b"\x5a" * 4
    finally:
        app.close()
        for fd in theirs:
            os.close(fd)


@pytest.mark.parametrize("value", [b"\x01" * THRESHOLD, bytearray(b"\x02" * ARENA), memoryview(b"\x03" * 5000)])
def test_a_buffer_crosses_the_arena_either_way_as_its_own_type(ports: tuple[BulkPort, BulkPort], value) -> None:
    for sender, receiver in (ports, ports[::-1]):
        record = sender.lend(value)
        assert bulk.decode_loan(record[: bulk.RECORD_SIZE], ARENA).placement == Placement.ARENA
        received = receiver.borrow(record)
        assert type(received) is type(value) and bytes(received) == bytes(value)
        assert sender.arena_in_use() >= len(bytes(value))
        sender.received()
        assert sender.arena_in_use() == 0


def test_slots_are_reused_and_a_full_arena_sends_sealed(ports: tuple[BulkPort, BulkPort]) -> None:
    app, compartment = ports
    quarter = b"\x04" * (ARENA // 4)
    records = [app.lend(quarter) for _ in range(4)]
    assert [bulk.decode_loan(r, ARENA).where for r in records] == [0, ARENA // 4, ARENA // 2, 3 * ARENA // 4]
    assert app.arena_in_use() == ARENA
    overflow = app.lend(quarter)  # no room left: a sealed memfd instead
    assert bulk.decode_loan(overflow, ARENA).placement == Placement.SEALED
    assert [compartment.borrow(r) for r in [*records, overflow]] == [quarter] * 5
    app.release([ARENA // 4])
    assert bulk.decode_loan(app.lend(b"\x05" * 100), ARENA).where == ARENA // 4  # first fit
    app.received()
    assert app.arena_in_use() == 0


def test_a_buffer_larger_than_the_arena_goes_sealed_and_leaves_no_descriptor(
    ports: tuple[BulkPort, BulkPort],
) -> None:
    app, compartment = ports
    fds = len(os.listdir("/proc/self/fd"))
    for value in (bytearray(b"\x06" * (ARENA + 1)), memoryview(b"\x07" * (2 * ARENA)).cast("I", [2, ARENA // 4])):
        record = app.lend(value)
        assert bulk.decode_loan(record[: bulk.RECORD_SIZE], ARENA).placement == Placement.SEALED
        received = compartment.borrow(record)
        assert type(received) is type(value) and bytes(received) == bytes(value)
        if isinstance(value, memoryview):
            assert (received.format, received.shape) == ("I", (2, ARENA // 4))
    assert app.arena_in_use() == 0 and compartment.unclaimed() == 0
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_viewed_buffer_is_read_only_and_does_not_follow_the_sender() -> None:
    app, theirs = open_port(ARENA, views=True)
    compartment = BulkPort(theirs, views=True)
    try:
        original = bytearray(b"\x08" * THRESHOLD)
        viewed = compartment.borrow(app.lend(original))
        assert type(viewed) is memoryview and viewed.readonly
        with pytest.raises(TypeError):
            viewed[0] = 0
        original[:] = bytes(THRESHOLD)
        assert bytes(viewed) == b"\x08" * THRESHOLD
        grid = memoryview(bytes(range(256)) * 256).cast("i", [64, 256])
        shaped = compartment.borrow(app.lend(grid))
        assert (shaped.readonly, shaped.format, shaped.shape, shaped.tolist()) == (True, "i", (64, 256), grid.tolist())
    finally:
        app.close()
        compartment.close()
    assert bytes(viewed) == b"\x08" * THRESHOLD  # a view outlives the port


def test_descriptors_never_named_are_held_up_to_the_bound_then_refused(ports: tuple[BulkPort, BulkPort]) -> None:
    app, compartment = ports
    for transfer in range(1, _UNCLAIMED + 3):
        fd = _memfd(b"z", SEALS)
        socket.send_fds(compartment._sock, [bulk.encode_transfer(transfer)], [fd])
        os.close(fd)
    record = bulk.encode_loan(Loan(Kind.BYTES, Placement.SEALED, _UNCLAIMED, 1))
    assert app.borrow(record) == b"z"  # found among the first _UNCLAIMED
    assert app.unclaimed() == _UNCLAIMED - 1
    with pytest.raises(ProtocolError, match="never named"):
        app.borrow(bulk.encode_loan(Loan(Kind.BYTES, Placement.SEALED, 10**6, 1)))
    assert app.unclaimed() == _UNCLAIMED
    fds = len(os.listdir("/proc/self/fd"))
    app.close()
    assert len(os.listdir("/proc/self/fd")) <= fds - _UNCLAIMED  # close() closes what was held


def test_a_frame_may_not_lend_more_than_max_frame() -> None:
    app, theirs = open_port(ARENA, max_frame=2 * THRESHOLD)
    compartment = BulkPort(theirs)
    try:
        records = [compartment.lend(b"\x09" * THRESHOLD) for _ in range(2)]
        app.received(1)  # the frame's own bytes count too: one byte too many for both buffers
        assert app.borrow(records[0]) == b"\x09" * THRESHOLD
        with pytest.raises(ReplyTooLarge, match="max_reply of 131072 bytes"):
            app.borrow(records[1])
        app.received(0)  # the next frame has a budget of its own
        assert app.borrow(records[1]) == b"\x09" * THRESHOLD
    finally:
        app.close()
        compartment.close()


def test_a_peer_that_takes_no_descriptors_fails_the_send_not_the_sender() -> None:
    app, theirs = open_port(ARENA)
    try:
        with pytest.raises(GateError, match=r"does not take the buffers it is sent \(its socket is full\)"):
            for _ in range(100_000):
                app.lend(b"\x0a" * (ARENA + 1))
    finally:
        app.close()
        for fd in theirs:
            os.close(fd)
