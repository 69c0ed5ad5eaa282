"""flexos._msgpack must be msgpack-python, byte for byte, for the options the gate protocol uses.

It exists because msgpack's C extension cannot load into a subinterpreter; these properties
keep the two interchangeable, and keep the decoder safe on hostile input.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

_msgpack = pytest.importorskip("flexos._msgpack")

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary())
)
values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=20) | st.dictionaries(st.text() | st.integers(-1000, 1000), children, max_size=20)
    ),
    max_leaves=60,
)
OPTIONS = {"use_bin_type": True, "strict_types": True}


@given(values)
@settings(max_examples=400, deadline=None)
def test_same_bytes_and_values_as_msgpack(value):
    packed = msgpack.packb(value, **OPTIONS)
    assert _msgpack.packb(value, **OPTIONS) == packed
    assert _msgpack.Packer(**OPTIONS).pack(value) == packed
    assert _msgpack.unpackb(packed, strict_map_key=False, raw=False) == msgpack.unpackb(
        packed, strict_map_key=False, raw=False
    )


def test_lengths_at_every_header_boundary():
    for n in (0, 15, 16, 31, 32, 255, 256, 65535, 65536):
        for value in ("s" * n, b"b" * n, ["x"] * n, {i: None for i in range(n)}, msgpack.ExtType(1, b"e" * n)):
            packed = msgpack.packb(value, **OPTIONS)
            assert _msgpack.packb(value, **OPTIONS) == packed
            assert _msgpack.unpackb(packed) == msgpack.unpackb(packed, strict_map_key=False)


def test_default_hook_and_its_limits():
    as_ext = lambda obj: msgpack.ExtType(1, _msgpack.packb(list(obj)))  # noqa: E731
    assert _msgpack.packb((1, 2), default=as_ext) == msgpack.packb((1, 2), default=as_ext, **OPTIONS)
    with pytest.raises(TypeError, match="serialize"):
        _msgpack.packb(object())
    with pytest.raises(TypeError, match="serialize"):
        _msgpack.packb(object(), default=lambda obj: obj)  # the hook is used once per value
    nested: list = []
    for _ in range(600):
        nested = [nested]
    with pytest.raises(ValueError, match="recursion"):
        _msgpack.packb(nested)


def test_lend_hook_replaces_large_buffers_only():
    lent = []

    def lend(buffer):
        lent.append(len(buffer))
        return msgpack.ExtType(12, b"loan")

    packed = _msgpack.packb([b"s" * 10, b"L" * 100, bytearray(200)], lend=lend, lend_threshold=100)
    assert lent == [100, 200]
    assert _msgpack.unpackb(packed) == [b"s" * 10, msgpack.ExtType(12, b"loan"), msgpack.ExtType(12, b"loan")]


@given(st.binary(max_size=200))
@settings(max_examples=2000, deadline=None)
def test_hostile_bytes_raise_only_value_or_type_errors(data):
    try:
        ours = _msgpack.unpackb(data, ext_hook=lambda code, payload: (code, payload))
    except (ValueError, TypeError):
        with pytest.raises((ValueError, TypeError, msgpack.exceptions.ExtraData)):
            msgpack.unpackb(data, strict_map_key=False, ext_hook=lambda code, payload: (code, payload), timestamp=3)
        return
    theirs = msgpack.unpackb(data, strict_map_key=False, ext_hook=lambda code, payload: (code, payload), timestamp=3)
    assert ours == theirs


def test_declared_lengths_beyond_the_input_are_refused_before_allocating():
    for header in (
        b"\xdd\xff\xff\xff\xff",
        b"\xdf\xff\xff\xff\xff",
        b"\xdb\xff\xff\xff\xff",
        b"\xc9\xff\xff\xff\xff\x01",
    ):
        with pytest.raises(ValueError, match="incomplete"):
            _msgpack.unpackb(header)
    with pytest.raises(ValueError, match="deeply"):
        _msgpack.unpackb(b"\x91" * 1000 + b"\x00")
