"""``sharing: {buffers: view}`` in flexos.yaml reaches the gates: a library placed in a ``process``
compartment that declares it gets large buffers as read-only views of sealed shared memory, and
the app gets its large results so; a library that does not gets (and gives) its own copies."""

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
