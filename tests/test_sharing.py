"""``sharing: {buffers: view}`` in flexos.yaml reaches the gates: a library placed in a ``process``
compartment that declares it gets large buffers as read-only views (of the app's arena, in place),
and the app gets its large results so (views of copies of its own); a library that does not gets
(and gives) its own copies. Then the ports themselves, against a hostile peer."""

from __future__ import annotations

import fcntl
import importlib
import mmap
import os
import socket
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flexos
from flexos import Image
from flexos.errors import ProtocolError
from flexos.transports.bulk import BulkPort, open_port
from flexos.wire import bulk
from flexos.wire.bulk import Kind, Loan, Placement

THRESHOLD = bulk.THRESHOLD  # 64 KiB: smaller buffers travel inside the frame

LIBRARY = '''\
"""Reports what it received, and makes buffers to return (it knows nothing of flexos)."""


def received(data):
    """The type, whether it is read-only, its length and its first and last bytes."""
    readonly = memoryview(data).readonly
    return type(data).__name__, readonly, len(data), bytes(data[:4]), bytes(data[-4:])


def try_to_write(data):
    """What writing into what it received does (a view's bytes are the app's, sealed)."""
    try:
        data[0] = 0
    except TypeError as exc:
        return type(exc).__name__
    return "written"


def make(size):
    return bytes(range(256)) * (size // 256)
'''

CONFIG = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: viewbox
    mechanism: {driver: process}
  - name: copybox
    mechanism: {driver: process}
libraries:
  sharedview: {compartment: viewbox, sharing: {buffers: view}}
  sharedcopy: {compartment: copybox}
"""


@pytest.fixture
def booted(tmp_path: Path) -> Iterator[tuple[Image, object, object]]:
    """The image loaded from a flexos.yaml in ``tmp_path``, booted: (image, view library, copy library)."""
    for name in ("sharedview", "sharedcopy"):
        (tmp_path / f"{name}.py").write_text(LIBRARY)
    (tmp_path / "flexos.yaml").write_text(textwrap.dedent(CONFIG))
    sys.path.insert(0, str(tmp_path))  # compartments start with the app's sys.path
    try:
        image = flexos.load(tmp_path / "flexos.yaml")
        with flexos.boot(image):
            yield image, importlib.import_module("sharedview"), importlib.import_module("sharedcopy")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("sharedview", "sharedcopy"):
            sys.modules.pop(name, None)


def test_the_key_reaches_the_image_and_survives_its_dict(booted) -> None:
    image, _, _ = booted
    assert image.library_sharing == {"sharedview": {"buffers": "view"}}
    assert image.buffer_sharing("viewbox") == "view" and image.buffer_sharing("copybox") == "copy"
    again = Image.from_dict(image.to_dict())
    assert again.library_sharing == image.library_sharing and again.buffer_sharing("viewbox") == "view"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_a_view_library_receives_a_read_only_view_of_a_large_buffer(booted, kind) -> None:
    _, view, copy = booted
    data = kind(b"head" + bytes(THRESHOLD) + b"tail")
    assert view.received(data) == ("memoryview", True, len(data), b"head", b"tail")
    assert view.try_to_write(data) == "TypeError"
    expected_type = kind.__name__
    assert copy.received(data) == (expected_type, kind is not bytearray, len(data), b"head", b"tail")
    assert copy.try_to_write(data) == ("TypeError" if kind in (bytes, memoryview) else "written")
    if kind is bytearray:
        assert data[:4] == b"head"  # ours, untouched: the library wrote into its own copy


def test_below_the_threshold_the_view_library_keeps_the_type(booted) -> None:
    _, view, _ = booted
    small = b"x" * (THRESHOLD - 1)
    assert view.received(small) == ("bytes", True, len(small), b"xxxx", b"xxxx")


def test_the_app_receives_a_large_result_as_a_read_only_view(booted) -> None:
    _, view, copy = booted
    back = view.make(THRESHOLD)
    assert type(back) is memoryview and back.readonly
    assert bytes(back) == bytes(range(256)) * (THRESHOLD // 256)
    with pytest.raises(TypeError):
        back[0] = 1
    copied = copy.make(THRESHOLD)
    assert type(copied) is bytes and copied == bytes(back)
    small = view.make(THRESHOLD - 256)
    assert type(small) is bytes


# -- the port each side holds: what a hostile peer can and cannot make the receiver hold --------


@pytest.fixture
def ports() -> Iterator[Callable[..., tuple[BulkPort, BulkPort]]]:
    """(app's port, compartment's port) over real memfds and a socket pair, ``views`` per side."""
    made: list[BulkPort] = []

    def _make(app_views: bool, compartment_views: bool) -> tuple[BulkPort, BulkPort]:
        app, compartment_fds = open_port(1 << 20, views=app_views)
        pair = app, BulkPort(compartment_fds, views=compartment_views)
        made.extend(pair)
        return pair

    yield _make
    for port in made:
        port.close()


def _lend_crafted(port: BulkPort, fd: int, transfer: int, size: int) -> bytes:
    """As a hostile compartment would: pass ``fd`` as sealed buffer ``transfer``; its LOAN record."""
    socket.send_fds(port._sock, [bulk.encode_transfer(transfer)], [fd])
    return bulk.encode_loan(Loan(Kind.BYTES, Placement.VIEW, transfer, size))


def _memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("hostile-buffer", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def test_a_view_lent_to_a_copy_port_arrives_as_the_receivers_own_copy(ports) -> None:
    """The receiver's strategy decides: a compartment cannot make the app hold views it did not ask for."""
    app, compartment = ports(app_views=False, compartment_views=True)
    data = b"v" * THRESHOLD
    received = app.borrow(compartment.lend(data))
    assert type(received) is bytes and received == data


def test_both_sides_of_a_view_port_get_views(ports) -> None:
    app, compartment = ports(app_views=True, compartment_views=True)
    data = bytearray(b"a" * THRESHOLD)
    there = compartment.borrow(app.lend(data))
    data[0] = ord("b")  # the app's later write does not reach what it lent: it lent a sealed snapshot
    assert type(there) is memoryview and there.readonly and bytes(there[:1]) == b"a"
    back = app.borrow(compartment.lend(there))
    assert type(back) is memoryview and back.readonly and bytes(back) == b"a" * THRESHOLD


def test_a_view_of_a_buffer_the_peer_can_still_write_is_refused(ports) -> None:
    app, compartment = ports(app_views=True, compartment_views=True)
    size = THRESHOLD
    fd = _memfd(b"\0" * size, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)  # no F_SEAL_WRITE
    try:
        with pytest.raises(ProtocolError, match="lent buffer"):
            app.borrow(_lend_crafted(compartment, fd, 1, size))
    finally:
        os.close(fd)


def test_the_peer_cannot_change_a_view_it_lent(ports) -> None:
    """A hostile lender keeps its descriptor: the seals it had to add bind it too, so what the
    receiver checked in the view stays what it checked."""
    app, compartment = ports(app_views=True, compartment_views=True)
    size = THRESHOLD
    fd = _memfd(b"ok" * (size // 2), fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    try:
        view = app.borrow(_lend_crafted(compartment, fd, 1, size))
        assert type(view) is memoryview and view.readonly
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"XX", 0)
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert bytes(view[:2]) == b"ok" and bytes(view) == b"ok" * (size // 2)
    finally:
        os.close(fd)


# -- views in place: the app's arena slot stays the compartment's until it drops the view ---------


def _arena_view(app: BulkPort, data: bytes) -> tuple[bytes, Loan]:
    record = app.lend(data)
    return record, bulk.decode_loan(record[: bulk.RECORD_SIZE], 1 << 20)


def test_a_buffer_the_app_lends_is_viewed_in_place_until_the_view_is_dropped(ports) -> None:
    """Zero-copy into the compartment: its view is of the app's arena (which it cannot write), and
    the slot is not reused while any view of it lives, however many buffers cross meanwhile."""
    app, compartment = ports(app_views=True, compartment_views=True)
    record, loan = _arena_view(app, b"1" * THRESHOLD)
    assert loan.placement == Placement.ARENA_VIEW
    first = compartment.borrow(record)
    assert type(first) is memoryview and first.readonly and bytes(first) == b"1" * THRESHOLD
    part = first[10:20]  # a slice holds the slot as the view does
    del first
    for fill in b"23456789":
        kept = compartment.borrow(app.lend(bytes([fill]) * THRESHOLD))
        assert bytes(kept) == bytes([fill]) * THRESHOLD
        del kept  # its slot comes back...
    assert bytes(part) == b"1" * 10  # ...the first one's does not
    assert app.arena_in_use() == THRESHOLD
    part.release()
    assert app.arena_in_use() == 0


def test_a_view_in_place_is_read_only_all_the_way_down(ports) -> None:
    """Neither the view nor what it is a view of (``view.obj``) gives a writable buffer."""
    import ctypes

    app, compartment = ports(app_views=True, compartment_views=True)
    view = compartment.borrow(app.lend(b"x" * THRESHOLD))
    with pytest.raises(TypeError):
        (ctypes.c_char * THRESHOLD).from_buffer(view)
    with pytest.raises(TypeError):
        memoryview(view.obj)
    assert bytes(view[:1]) == b"x"


def test_a_compartment_that_keeps_every_view_makes_the_app_lend_sealed_buffers(ports) -> None:
    """The app's arena fills with slots still viewed: further buffers cross as sealed memfds, as
    large ones always do; nothing the compartment holds changes."""
    app, compartment = ports(app_views=True, compartment_views=True)
    size = 256 << 10  # four fill the 1 MiB arena
    kept = [compartment.borrow(app.lend(bytes([i]) * size)) for i in range(6)]
    assert [bytes(view[:1]) + bytes(view[-1:]) for view in kept] == [bytes([i, i]) for i in range(6)]
    assert app.arena_in_use() == 4 * size
    assert bulk.decode_loan(app.lend(b"s" * size)[: bulk.RECORD_SIZE], 1 << 20).placement == Placement.VIEW
    compartment.borrow(app.lend(b"s" * size))  # (the descriptor of the sealed one above is still queued)
    del kept
    assert app.arena_in_use() == 0


@pytest.mark.parametrize(
    "forged",
    [
        bulk.encode_release([0]),  # a slot that is not lent
        bulk.encode_release([4096]),  # not lent either: the one lent starts at 0
        bulk.encode_release([0, 0]),  # the slot that is lent, twice
    ],
    ids=["not-lent", "no-slot-there", "twice"],
)
def test_a_release_of_what_was_not_lent_is_refused_and_ends_lending_in_place(ports, forged: bytes) -> None:
    app, compartment = ports(app_views=True, compartment_views=True)
    if forged != bulk.encode_release([0]):
        kept = compartment.borrow(app.lend(b"k" * THRESHOLD))  # slot 0, viewed
    compartment._sock.sendmsg([forged])
    with pytest.raises(ProtocolError, match="released a buffer it was not lent"):
        app.lend(b"n" * THRESHOLD)
    record = app.lend(b"n" * THRESHOLD)  # later buffers are copied out: no word of the peer's needed
    assert bulk.decode_loan(record[: bulk.RECORD_SIZE], 1 << 20).placement == Placement.ARENA
    assert bytes(compartment.borrow(record)) == b"n" * THRESHOLD
    if forged != bulk.encode_release([0]):
        assert bytes(kept) == b"k" * THRESHOLD


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (bulk.RELEASE_TAG, "malformed buffer release message"),  # no offset
        (bulk.RELEASE_TAG + bytes(7), "malformed buffer release message"),
        (bulk.RELEASE_TAG + bytes(8) * (bulk.MAX_RELEASES + 1), "malformed buffer release message"),
    ],
    ids=["no-offset", "short-offset", "too-many"],
)
def test_a_malformed_release_message_is_refused(ports, message: bytes, error: str) -> None:
    app, compartment = ports(app_views=True, compartment_views=True)
    kept = compartment.borrow(app.lend(b"k" * THRESHOLD))
    compartment._sock.sendmsg([message])
    with pytest.raises(ProtocolError, match=error):
        app.arena_in_use()
    assert bytes(kept) == b"k" * THRESHOLD


def test_a_release_with_a_descriptor_is_no_release(ports) -> None:
    """A descriptor never rides a RELEASE: the message is taken for a (malformed) transfer, and the
    descriptor closed."""
    app, compartment = ports(app_views=True, compartment_views=True)
    compartment.borrow(app.lend(b"k" * THRESHOLD))
    fd = _memfd(b"z", 0)
    before = len(os.listdir("/proc/self/fd"))
    try:
        socket.send_fds(compartment._sock, [bulk.encode_release([0])], [fd])
    finally:
        os.close(fd)
    with pytest.raises(ProtocolError, match="malformed buffer transfer message"):
        app.arena_in_use()
    assert len(os.listdir("/proc/self/fd")) < before


def test_the_app_views_its_own_copy_of_what_the_compartment_lends(ports) -> None:
    """The compartment's arena is its own to write: the app's view is of a copy in memory of the
    app's, which the compartment's later writes never reach; the copy's slot is reused once the
    view is dropped."""
    app, compartment = ports(app_views=True, compartment_views=True)
    record = compartment.lend(b"c" * THRESHOLD)
    assert bulk.decode_loan(record[: bulk.RECORD_SIZE], 1 << 20).placement == Placement.ARENA
    view = app.borrow(record)
    compartment._out[:THRESHOLD] = b"X" * THRESHOLD  # the sender rewrites its slot
    assert type(view) is memoryview and view.readonly and bytes(view) == b"c" * THRESHOLD
    assert app.copies_in_use() == THRESHOLD
    del view
    assert app.copies_in_use() == 0


def test_a_view_of_a_copy_is_a_fresh_object_when_the_copies_are_full(ports) -> None:
    app, compartment = ports(app_views=True, compartment_views=True)
    size = 256 << 10
    kept = []
    for i in range(6):  # the copies' space is the arena's size (1 MiB): four slots
        kept.append(app.borrow(compartment.lend(bytes([i]) * size)))
        compartment.received()  # the app's next frame: the compartment's slot is free again
    assert [bytes(view[:1]) for view in kept] == [bytes([i]) for i in range(6)]
    assert all(view.readonly for view in kept)
    assert app.copies_in_use() == 4 * size
    del kept
    assert app.copies_in_use() == 0
