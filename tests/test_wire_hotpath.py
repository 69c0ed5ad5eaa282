"""The gate's hot path (flexos._msgpack's call_frame, reply_frame, reply_value, call_parts) against
the Python path it shortcuts and msgpack-python, byte for byte.

A frame of plain values must come out of the C encoders exactly as encode_call / encode_reply
make it, and the C decoders must return exactly what decode_frame returns for it. Every other
frame, hostile ones included, must be left to the Python path (None / NOT_PLAIN), so that a
refusal is always the Python path's own, with its error kind.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexos.errors import FlexosError, ProtocolError
from flexos.gates import link as link_module
from flexos.gates.link import Link
from flexos.transports import PeerGone, ReplyTooLarge
from flexos.transports.loopback import LoopbackTransport
from flexos.wire import frames
from flexos.wire.codec import Codec
from flexos.wire.frames import (
    NO_KWARGS,
    NOT_PLAIN,
    Kind,
    Op,
    decode_frame,
    encode_call,
    encode_reply,
    plain_call_frame,
    plain_call_parts,
    plain_reply_frame,
    plain_reply_value,
    plain_serve_call,
)

_msgpack = pytest.importorskip("flexos._msgpack")
NO_LIMIT = 1 << 62

plain_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text()
    | st.binary(max_size=64)
)
plain_values = st.recursive(
    plain_leaves,
    lambda children: (
        st.lists(children, max_size=8)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), children, max_size=8)
    ),
    max_leaves=30,
)
# Values the hot path must leave to the codec: each needs an extension type (or a reference).
not_plain_leaves = (
    st.integers(min_value=2**64, max_value=2**80)
    | st.integers(min_value=-(2**80), max_value=-(2**63) - 1)
    | st.tuples(st.integers())
    | st.frozensets(st.integers(), max_size=3)
    | st.sets(st.integers(), max_size=3)
    | st.builds(bytearray, st.binary(max_size=8))
    | st.builds(memoryview, st.binary(max_size=8))
    | st.complex_numbers(allow_nan=False)
    | st.just("lone \ud800 surrogate")
    | st.builds(object)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
    | st.just(Ellipsis)
    | st.just(int)
)
ops = st.sampled_from(sorted(v for k, v in vars(Op).items() if not k.startswith("_")))
targets = st.integers(0, 2**64 - 1) | st.text(max_size=20)
names = st.none() | st.text(max_size=20)
kwargs_maps = st.none() | st.dictionaries(st.text(max_size=8), plain_values, max_size=4)
release_lists = st.lists(st.lists(st.integers(0, 2**32), min_size=2, max_size=2), max_size=3)


class _Space:
    """A reference space that must never be used: plain frames name no object."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the reference space was asked for {name}")


def _reference_call(op: int, target: Any, name: Any, args: Any, kwargs: Any, releases: Any) -> bytes:
    """The CALL frame as msgpack-python packs the layout frames.py documents."""
    frame = [Kind.CALL, op, target, name, list(args) if args else None, kwargs or None, releases]
    return msgpack.packb(frame, use_bin_type=True, strict_types=True)


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (NaN equal to itself)."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


# -- encoders: byte for byte ----------------------------------------------------------------------
@given(ops, targets, names, st.lists(plain_values, max_size=5), kwargs_maps, release_lists, st.booleans())
@settings(max_examples=400, deadline=None)
def test_plain_call_frame_is_encode_call_byte_for_byte(op, target, name, args, kwargs, releases, as_tuple):
    args = tuple(args) if as_tuple else args
    fast = plain_call_frame(op, target, name, args, kwargs, releases, NO_LIMIT)
    assert fast is not None
    assert fast == encode_call(Codec(_Space()), op, target, name, args, kwargs, releases)
    assert fast == _reference_call(op, target, name, args, kwargs, releases)


@given(plain_values, release_lists)
@settings(max_examples=300, deadline=None)
def test_plain_reply_frame_is_encode_reply_byte_for_byte(value, releases):
    fast = plain_reply_frame(value, releases, NO_LIMIT)
    assert fast is not None
    assert fast == encode_reply(Codec(_Space()), value, releases)
    assert fast == msgpack.packb([Kind.REPLY, value, releases], use_bin_type=True, strict_types=True)


@given(st.lists(plain_values, max_size=3), not_plain_leaves, st.integers(0, 3), st.booleans())
@settings(max_examples=300, deadline=None)
def test_a_value_that_is_not_plain_is_left_to_the_codec(args, odd, where, in_kwargs):
    nested = [odd] if where == 1 else {"k": odd} if where == 2 else [[{"x": odd}]] if where == 3 else odd
    if in_kwargs:
        assert plain_call_frame(Op.CALL, 1, None, tuple(args), {"key": nested}, [], NO_LIMIT) is None
    else:
        assert plain_call_frame(Op.CALL, 1, None, (*args, nested), None, [], NO_LIMIT) is None
    assert plain_reply_frame(nested, [], NO_LIMIT) is None
    assert plain_call_frame(Op.CALL, odd, None, (), None, [], NO_LIMIT) is None or type(odd) is str


def test_other_shapes_are_left_to_the_codec():
    assert plain_call_frame(Op.CALL, 1, None, iter([1]), None, [], NO_LIMIT) is None  # any iterable
    assert plain_call_frame(Op.CALL, 1, None, (), [("k", 1)], [], NO_LIMIT) is None  # kwargs not a dict
    assert plain_call_frame(Op.CALL, 1, None, (), None, ((1, 1),), NO_LIMIT) is None  # releases not lists
    assert plain_call_frame(Op.CALL, True, None, (), None, [], NO_LIMIT) is not None  # as the codec packs it
    assert plain_reply_frame(1 << 64, [], NO_LIMIT) is None
    # An IntEnum or str subclass crosses by the codec's rules, never as the plain base value.
    assert plain_reply_frame(Kind, [], NO_LIMIT) is None
    assert plain_reply_frame(type("S", (str,), {})("x"), [], NO_LIMIT) is None


def test_bytes_from_the_lending_threshold_on_are_left_to_the_codec():
    assert plain_call_frame(Op.CALL, 1, None, (b"x" * 99,), None, [], 100) is not None
    assert plain_call_frame(Op.CALL, 1, None, (b"x" * 100,), None, [], 100) is None
    assert plain_reply_frame([b"x" * 100], [], 100) is None
    assert plain_reply_frame("x" * 1000, [], 100) is not None  # str is never lent


def test_nesting_past_the_plain_depth_and_cycles_are_left_to_the_codec():
    deep: list[Any] = []
    for _ in range(40):
        deep = [deep]
    assert plain_reply_frame(deep, [], NO_LIMIT) is None
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    assert plain_call_frame(Op.CALL, 1, None, (cyclic,), None, [], NO_LIMIT) is None
    shallow: list[Any] = []
    for _ in range(10):
        shallow = [shallow]
    assert plain_reply_frame(shallow, [], NO_LIMIT) == encode_reply(Codec(_Space()), shallow, [])


def test_large_frames_and_every_header_boundary():
    for n in (0, 15, 16, 31, 32, 255, 256, 65535, 65536, 70000):
        for value in ("s" * n, b"b" * n, ["x"] * n, {i: None for i in range(n)}):
            assert plain_reply_frame(value, [], NO_LIMIT) == encode_reply(Codec(_Space()), value, [])
            args = (value,) * 3
            assert plain_call_frame(Op.CALL, 7, None, args, None, [], NO_LIMIT) == _reference_call(
                Op.CALL, 7, None, args, None, []
            )
    # The module's frame buffer is shrunk after a large frame and still right for the next.
    assert plain_reply_frame(1, [], NO_LIMIT) == encode_reply(Codec(_Space()), 1, [])


# -- decoders: exactly what decode_frame returns --------------------------------------------------
@given(plain_values)
@settings(max_examples=300, deadline=None)
def test_plain_reply_value_is_decode_frame(value):
    data = msgpack.packb([Kind.REPLY, value, []], use_bin_type=True)
    fast = plain_reply_value(data)
    assert fast is not NOT_PLAIN
    assert _same(fast, decode_frame(Codec(_Space()), data)[1])
    assert _same(fast, msgpack.unpackb(data, strict_map_key=False)[1])


@given(ops, targets, names, st.none() | st.lists(plain_values, max_size=5), kwargs_maps)
@settings(max_examples=300, deadline=None)
def test_plain_call_parts_are_decode_frame(op, target, name, args, kwargs):
    data = msgpack.packb([Kind.CALL, op, target, name, args, kwargs, []], use_bin_type=True)
    parts = plain_call_parts(data, NO_KWARGS)
    assert parts is not None
    frame = decode_frame(Codec(_Space()), data)
    assert _same(list(parts), frame[1:6])
    if args is None:
        assert parts[3] == ()
    if kwargs is None:
        assert parts[4] is NO_KWARGS


release_lists = st.lists(st.lists(st.integers(-(2**63), 2**64 - 1), min_size=2, max_size=2), max_size=4)


@given(ops, targets, names, st.none() | st.lists(plain_values, max_size=3), kwargs_maps, release_lists)
@settings(max_examples=300, deadline=None)
def test_the_releases_a_plain_call_carries_are_decode_frames(op, target, name, args, kwargs, releases):
    """A call that carries releases (what the app's dead proxies free) stays on the hot path: its
    fields, and its releases as a sixth item, are what decode_frame gives."""
    data = msgpack.packb([Kind.CALL, op, target, name, args, kwargs, releases], use_bin_type=True)
    parts = plain_call_parts(data, NO_KWARGS)
    frame = decode_frame(Codec(_Space()), data)
    assert parts is not None and _same(list(parts[:5]), frame[1:6])
    assert (parts[5] if releases else []) == frame[6] == releases
    assert len(parts) == (6 if releases else 5)


# Release lists decode_frame refuses: the hot path must leave each to it.
MALFORMED_RELEASES = {
    "a pair of one": [[1]],
    "a pair of three": [[1, 2, 3]],
    "a bool handle": [[True, 1]],
    "a float count": [[1, 1.0]],
    "a str count": [[1, "1"]],
    "a bare int": [1, 2],
    "a map": {"a": 1},
    "nested pairs": [[[1, 2], 1]],
    "an int": 5,
    "none": None,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_RELEASES))
def test_malformed_releases_are_left_to_decode_frame(case):
    data = msgpack.packb([Kind.CALL, Op.CALL, 3, None, None, None, MALFORMED_RELEASES[case]], use_bin_type=True)
    assert plain_call_parts(data, NO_KWARGS) is None
    assert plain_serve_call(data, {3: [lambda: 1, 1]}, NO_KWARGS, [], NO_LIMIT) is None
    assert _python_path(data) is ProtocolError


class _RefusingSpace:
    """A reference space that knows no object: every reference is refused, as a link refuses a
    handle it never gave out."""

    def __getattr__(self, name: str) -> Any:
        def refuse(*args: Any) -> Any:
            raise ProtocolError(f"{name} refused")

        return refuse


def _python_path(data: bytes) -> Any:
    """decode_frame's answer: the frame, or the type of what it raised."""
    try:
        return decode_frame(Codec(_RefusingSpace()), data)
    except ProtocolError as exc:
        return type(exc)


def _check_hostile(data: bytes) -> None:
    """The hot path either leaves ``data`` to decode_frame, or returns what decode_frame returns."""
    expected = _python_path(data)
    value = plain_reply_value(data)
    if value is not NOT_PLAIN:
        assert type(expected) is list and expected[0] == Kind.REPLY and _same(value, expected[1])
    parts = plain_call_parts(data, NO_KWARGS)
    if parts is not None:
        assert type(expected) is list and expected[0] == Kind.CALL and _same(list(parts[:5]), expected[1:6])
        assert _same(list(parts[5]) if len(parts) == 6 else [], expected[6])


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_hostile_bytes_are_decode_frames_business(data):
    _check_hostile(data)
    _check_hostile(b"\x93\x02" + data + b"\x90")
    _check_hostile(b"\x97\x01" + data + b"\x90")


@given(
    st.integers(-5, 20),
    st.one_of(targets, st.floats(), st.none(), st.booleans(), st.lists(st.integers(-9, 9), max_size=2)),
    st.one_of(names, st.integers(-9, 9), st.binary(max_size=3)),
    st.one_of(st.none(), st.lists(plain_values, max_size=2), st.integers(-9, 9), st.text(max_size=3)),
    st.one_of(
        kwargs_maps, st.dictionaries(st.integers(-9, 9), st.integers(-9, 9), min_size=1, max_size=2), st.integers(-9, 9)
    ),
)
@settings(max_examples=500, deadline=None)
def test_calls_of_wrong_field_types_are_refused_by_decode_frame_alone(op, target, name, args, kwargs):
    data = msgpack.packb([Kind.CALL, op, target, name, args, kwargs, []], use_bin_type=True)
    _check_hostile(data)


HOSTILE = {
    "truncated reply": msgpack.packb([2, "abcdef", []])[:-3] + b"\x90",
    "truncated call": msgpack.packb([1, 5, 3, None, [1, 2, 3], None, []])[:-4] + b"\x90",
    "oversized array length": b"\x93\x02\xdd\xff\xff\xff\xff\x90",
    "oversized str length": b"\x93\x02\xdb\xff\xff\xff\xf0abc\x90",
    "oversized bin length": b"\x97\x01\x05\x03\xc0\x91\xc6\x7f\xff\xff\xff\xc0\x90",
    "oversized map length": b"\x97\x01\x05\x03\xc0\xc0\xdf\xff\xff\xff\xff\x90",
    "deep nesting": b"\x93\x02" + b"\x91" * 100_000 + b"\xc0\x90",
    "deep nesting in args": b"\x97\x01\x05\x03\xc0" + b"\x91" * 100_000 + b"\xc0\xc0\x90",
    "extra data": msgpack.packb([2, 1, []]) + b"\x00",
    "value overruns into releases": b"\x93\x02\x92\x01\x90",
    "invalid utf-8": b"\x93\x02\xa2\xff\xfe\x90",
    "unknown type byte": b"\x93\x02\xc1\x90",
    "unhashable map key": b"\x93\x02\x81\x90\x01\x90",
    "unhashable kwargs key": b"\x97\x01\x05\x03\xc0\xc0\x81\x90\x01\x90",
    "kwargs key not a str": msgpack.packb([1, 5, 3, None, None, {1: 2}, []]),
    "op out of range": msgpack.packb([1, 11, 3, None, None, None, []]),
    "op a bool": msgpack.packb([1, True, 3, None, None, None, []]),
    "huge op": msgpack.packb([1, 2**64 - 1, 3, None, None, None, []]),
    "target a float": msgpack.packb([1, 5, 3.0, None, None, None, []]),
    "name an int": msgpack.packb([1, 6, 3, 7, None, None, []]),
    "args a map": msgpack.packb([1, 5, 3, None, {"a": 1}, None, []]),
    "kind a longer int": b"\x93\xcc\x02\x01\x90",
    "releases not empty": msgpack.packb([2, 1, [[1, 1]]]),
    "reply of four fields": msgpack.packb([2, 1, [], 0]),
    "call of six fields": msgpack.packb([1, 5, 3, None, None, []]),
    "forged reference in a reply": msgpack.packb([2, msgpack.ExtType(7, b"\x01" * 16), []]),
    "forged back-reference in args": msgpack.packb([1, 5, 3, None, [msgpack.ExtType(9, b"\x05" * 8)], None, []]),
    "forged handle target ext": msgpack.packb([1, 5, msgpack.ExtType(9, b"\x05" * 8), None, None, None, []]),
    "an error frame": msgpack.packb([3, msgpack.ExtType(11, b"\x90"), "", []]),
    "a call where a reply is due": msgpack.packb([1, 5, 3, None, None, None, []]),
    "not an array": b"\x02",
    "empty": b"",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_frames_get_the_python_paths_answer(case):
    _check_hostile(HOSTILE[case])


def test_the_decoders_take_only_bytes():
    assert plain_reply_value(bytearray(msgpack.packb([2, 1, []]))) is NOT_PLAIN
    assert plain_call_parts(memoryview(msgpack.packb([1, 5, 3, None, None, None, []])), NO_KWARGS) is None


# -- the link: a plain call is served as the Python path serves it ---------------------------------
class _Held:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return [args, kwargs]

    def method(self, x: Any) -> Any:
        return x

    def _private(self) -> None:
        raise AssertionError("a compartment called a private method")


def _answers(frame: bytes, *, plain: bool) -> tuple[Any, ...]:
    """What a fresh compartment-facing link answers to ``frame`` (kind, and the value or the
    exception's type and message), with the hot path on or off."""
    link = Link("peer")
    held = _Held()
    handle = link.export(held)
    assert handle == 1
    link.export_class(_Held)  # a described-only class handle: 2
    saved = link_module.plain_serve_call
    if not plain:
        link_module.plain_serve_call = frames._no_plain_frame
    try:
        reply = link.dispatch(frame)
    finally:
        link_module.plain_serve_call = saved
    decoded = decode_frame(link.codec, reply)
    if decoded[0] == Kind.REPLY:
        return ("reply", decoded[1], held.calls)
    exc = decoded[1]
    return ("error", type(exc), str(exc), held.calls)


SERVED = {
    "call of a held handle": [1, Op.CALL, 1, None, [1, "a", [2.5]], {"k": None}, []],
    "call without arguments": [1, Op.CALL, 1, None, None, None, []],
    "call of a handle not held": [1, Op.CALL, 99, None, [1], None, []],
    "call of a described-only class": [1, Op.CALL, 2, None, None, None, []],
    "public method": [1, Op.CALL_METHOD, 1, "method", [7], None, []],
    "private method": [1, Op.CALL_METHOD, 1, "_private", None, None, []],
    "getattr of a dunder": [1, Op.GETATTR, 1, "__class__", None, None, []],
    "setattr of a private name": [1, Op.SETATTR, 1, "_x", [1], None, []],
    "import refused": [1, Op.IMPORT, "os", None, None, None, []],
    "import with an int target": [1, Op.IMPORT, 5, None, None, None, []],
    "unknown operator": [1, Op.OPERATOR, 1, "nope", None, None, []],
    "subclass from a compartment": [1, Op.SUBCLASS, 2, "X", [1, 2, 3, 4], None, []],
}


def test_releases_a_plain_call_carries_are_applied_as_the_python_path_applies_them():
    """The link frees what a call's releases name, deferred when asked to, on either path."""
    for plain in (True, False):
        for deferred in (None, []):
            link = Link("peer")
            held = _Held()
            assert link.export(held) == 1
            dropped = link.export(object())
            frame = msgpack.packb([1, Op.CALL, 1, None, [5], None, [[dropped, 1]]], use_bin_type=True)
            saved = link_module.plain_serve_call
            if not plain:
                link_module.plain_serve_call = frames._no_plain_frame
            try:
                reply = link.dispatch(frame, deferred)
            finally:
                link_module.plain_serve_call = saved
            assert decode_frame(link.codec, reply)[1] == [(5,), {}] and held.calls == [((5,), {})]
            if deferred is None:
                assert dropped not in link.exports.objects
            else:
                assert dropped in link.exports.objects and deferred == [[dropped, 1]]


@pytest.mark.parametrize("case", sorted(SERVED))
def test_a_plain_call_is_served_as_the_python_path_serves_it(case):
    frame = msgpack.packb(SERVED[case], use_bin_type=True)
    assert plain_call_parts(frame, NO_KWARGS) is not None  # the hot path takes it
    assert _answers(frame, plain=True) == _answers(frame, plain=False)


def test_a_described_class_is_not_callable_through_the_hot_path():
    frame = msgpack.packb([1, Op.CALL, 2, None, None, None, []], use_bin_type=True)
    kind, error, message, _ = _answers(frame, plain=True)
    assert kind == "error" and error is TypeError and "was not granted" in message


SERVED_BY_THE_LINK = {
    "a result that is not plain": [1, Op.CALL, 3, None, [[1, 2]], None, []],
    "a callee that raises": [1, Op.CALL, 4, None, None, None, []],
    "a callee that raises StopIteration": [1, Op.CALL, 5, None, None, None, []],
    "a callee that exits": [1, Op.CALL, 6, None, None, None, []],
}


def _serving_link() -> Link:
    link = Link("peer")
    link.export(_Held())  # 1
    link.export_class(_Held)  # 2
    link.export(tuple)  # 3: a result that needs the codec
    link.export(lambda: 1 / 0)  # 4
    link.export(lambda: next(iter(())))  # 5
    link.export(lambda: exit(3))  # 6
    return link


@pytest.mark.parametrize("case", sorted(SERVED_BY_THE_LINK))
def test_what_the_c_path_hands_back_is_encoded_as_the_python_path_encodes_it(case):
    frame = msgpack.packb(SERVED_BY_THE_LINK[case], use_bin_type=True)
    answers = []
    for plain in (True, False):
        link = _serving_link()
        saved = link_module.plain_serve_call
        if not plain:
            link_module.plain_serve_call = frames._no_plain_frame
        try:
            decoded = decode_frame(link.codec, link.dispatch(frame))
        finally:
            link_module.plain_serve_call = saved
        answers.append((decoded[0], type(decoded[1]), str(decoded[1]), bool(decoded[0] == Kind.ERROR and decoded[2])))
    assert answers[0] == answers[1]


def test_serve_call_answers():
    objects = {1: [lambda *a, **k: [list(a), k], 1], 2: [lambda: (1,), 1], 3: [lambda: 1 / 0, 1]}
    call = msgpack.packb([1, Op.CALL, 1, None, [1, "x"], {"k": 2}, []], use_bin_type=True)
    assert plain_serve_call(call, objects, NO_KWARGS, [], NO_LIMIT) == msgpack.packb([2, [[1, "x"], {"k": 2}], []])
    # Releases waiting: the result, for the link to send with them.
    assert plain_serve_call(call, objects, NO_KWARGS, [object()], NO_LIMIT) == ([[1, "x"], {"k": 2}],)
    # Not plain: the result, for the codec.
    assert plain_serve_call(msgpack.packb([1, 5, 2, None, None, None, []]), objects, NO_KWARGS, [], NO_LIMIT) == ((1,),)
    with pytest.raises(ZeroDivisionError):
        plain_serve_call(msgpack.packb([1, 5, 3, None, None, None, []]), objects, NO_KWARGS, [], NO_LIMIT)
    # Releases carried: the fields and the releases, nothing run (the link applies them first).
    ran: list[int] = []
    objects[4] = [lambda: ran.append(1), 1]
    carrying = msgpack.packb([1, Op.CALL, 4, None, None, None, [[9, 2]]])
    assert plain_serve_call(carrying, objects, NO_KWARGS, [], NO_LIMIT) == (Op.CALL, 4, None, (), NO_KWARGS, [[9, 2]])
    assert not ran
    # Not a held handle, another op, or no objects given: the fields, nothing run.
    for frame, objs in (
        ([1, 5, 9, None, None, None, []], objects),
        ([1, 6, 1, "m", None, None, []], objects),
        ([1, 5, 1, None, None, None, []], None),
    ):
        parts = plain_serve_call(msgpack.packb(frame), objs, NO_KWARGS, [], NO_LIMIT)
        assert parts == plain_call_parts(msgpack.packb(frame), NO_KWARGS) and len(parts) == 5
    for case in sorted(HOSTILE):
        served = plain_serve_call(HOSTILE[case], {}, NO_KWARGS, [], NO_LIMIT)
        assert served is None or (len(served) == 5 and type(_python_path(HOSTILE[case])) is list)


# -- the caller's side: what an inline peer answers -----------------------------------------------
def _calling_link(answer: Any) -> Link:
    """A link whose inline peer answers every frame with ``answer(frame)``."""
    link = Link("peer")
    link.attach(LoopbackTransport(lambda frame, deferred=None: answer(frame)))
    return link


def test_an_inline_peers_plain_reply_is_the_calls_value():
    sent: list[bytes] = []
    link = _calling_link(lambda frame: sent.append(frame) or msgpack.packb([2, {"v": [1, 2.5]}, []]))
    assert link.call(Op.CALL, 7, None, (1, "x")) == {"v": [1, 2.5]}
    assert sent == [_reference_call(Op.CALL, 7, None, (1, "x"), None, [])]


def test_an_inline_peer_answering_with_a_call_frame_is_refused_not_served():
    served: list[bytes] = []
    link = _calling_link(lambda frame: msgpack.packb([1, Op.CALL, 1, None, None, None, []]))
    link.dispatch = lambda data, deferred=None: served.append(data) or b""  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="call frame"):
        link.call(Op.CALL, 7)
    assert served == []


def test_an_inline_peers_malformed_or_oversized_answer_is_refused():
    for answer in (b"\x93\x02\xc1\x90", b"\x93\x02\xdd\xff\xff\xff\xff\x90", b""):
        with pytest.raises(ProtocolError):
            _calling_link(lambda frame, answer=answer: answer).call(Op.CALL, 7)

    def too_large(frame: bytes) -> bytes:
        raise ReplyTooLarge("over the bound")

    with pytest.raises(ReplyTooLarge, match="compartment 'peer': over the bound"):
        _calling_link(too_large).call(Op.CALL, 7)


def test_an_inline_peer_gone_closes_the_link():
    def gone(frame: bytes) -> bytes:
        raise PeerGone("ended")

    link = _calling_link(gone)
    with pytest.raises(FlexosError, match="loopback peer closed"):  # what the transport says the death is
        link.call(Op.CALL, 7)
    assert link.closed
