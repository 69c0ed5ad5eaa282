"""``sharing: {buffers: view}`` in flexos.yaml reaches the gates: a library placed in a ``process``
compartment that declares it gets large buffers as read-only views of sealed shared memory, and
the app gets its large results so; a library that does not gets (and gives) its own copies."""

from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import flexos
from flexos import Image

THRESHOLD = 64 << 10  # flexos.wire.bulk.THRESHOLD: smaller buffers travel inside the frame

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
