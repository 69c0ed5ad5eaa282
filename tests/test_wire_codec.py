"""flexos._msgpack must be msgpack-python, byte for byte, for the options the gate protocol uses.

It exists because msgpack's C extension cannot load into a subinterpreter; these properties
keep the two interchangeable, and keep the decoder safe on hostile input. The last tests check
frames and values as bytes alone, with a reference space of a few objects instead of a link.
"""

from __future__ import annotations

import json
import struct
import sys

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexos.errors import GateError, ProtocolError
from flexos.wire.codec import KEPT_EXCEPTIONS, NOT_A_REFERENCE, Codec, Ext
from flexos.wire.frames import (
    CALL_ARGS,
    CALL_KWARGS,
    CALL_NAME,
    CALL_OP,
    CALL_RELEASES,
    CALL_TARGET,
    ERROR_EXCEPTION,
    KIND,
    REPLY_VALUE,
    Kind,
    Op,
    decode_frame,
    encode_call,
    encode_error,
    encode_reply,
)

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


# -- frames and values, bytes only: a reference space of a few objects instead of a link -----------


class _Space:
    """The codec's ReferenceSpace with no link behind it: handles are positions in two lists, and
    a frame this side encodes decodes here as if it came back from a peer."""

    def __init__(self) -> None:
        self.exported: list[object] = []
        self.classes: list[type] = []
        self.granted: list[type] = []
        self.withdrawn: list[object] = []

    def export(self, obj: object) -> int:
        self.exported.append(obj)
        return len(self.exported)

    def export_class(self, cls: type) -> int:
        if cls not in self.classes:
            self.classes.append(cls)
        return 100 + self.classes.index(cls)

    def grant_class(self, cls: type) -> int:
        self.granted.append(cls)
        return self.export_class(cls)

    def withdraw(self, exported: list[object]) -> None:
        self.withdrawn.extend(exported)

    def module(self, name: str) -> tuple[str, str]:
        return ("module", name)

    def peer_handle(self, obj: object) -> int | None:
        return None

    def is_proxy_type(self, cls: type) -> bool:
        return False

    def proxy(self, handle: int, class_handle: int) -> tuple[str, int, int]:
        return ("proxy", handle, class_handle)

    def proxy_class(self, handle: int, module: str, qualname: str) -> type:
        if not 0 <= handle - 100 < len(self.classes):
            raise ProtocolError(f"class handle {handle} was never sent")
        return self.classes[handle - 100]

    def resolve(self, handle: int) -> object:
        if not 0 < handle <= len(self.exported):
            raise ProtocolError(f"handle {handle} was never sent")
        return self.exported[handle - 1]

    def borrow(self, payload: bytes) -> object:
        raise ProtocolError("no loans here")


def test_frames_have_the_documented_layout():
    """The builders write exactly the arrays frames.py documents; decode_frame reads them back."""
    codec = Codec(_Space())
    call = encode_call(codec, Op.CALL_METHOD, 5, "execute", ("select 1",), None, [[3, 2]])
    assert call == msgpack.packb([1, 6, 5, "execute", ["select 1"], None, [[3, 2]]], use_bin_type=True)
    frame = decode_frame(codec, call)
    assert frame[KIND] == Kind.CALL and frame[CALL_OP] == Op.CALL_METHOD and frame[CALL_TARGET] == 5
    assert (frame[CALL_NAME], frame[CALL_ARGS], frame[CALL_KWARGS], frame[CALL_RELEASES]) == (
        "execute",
        ["select 1"],
        {},
        [[3, 2]],
    )
    bare = decode_frame(codec, encode_call(codec, Op.CALL, 5, None, (), {}, []))
    assert bare[CALL_ARGS] == () and bare[CALL_KWARGS] == {}  # empty arguments travel as None
    reply = encode_reply(codec, (1, "a"), [])
    assert reply == msgpack.packb([2, msgpack.ExtType(1, msgpack.packb([1, "a"])), []], use_bin_type=True)
    assert decode_frame(codec, reply)[REPLY_VALUE] == (1, "a")


def test_objects_cross_by_handle_and_come_back_as_themselves():
    """A plain object is sent as REF [handle, class handle]; the peer naming it back (BACK) gets
    the very object; a handle that was never sent is refused."""
    space = _Space()
    codec = Codec(space)
    obj = object()
    reply = encode_reply(codec, obj, [])
    assert reply == msgpack.packb([2, msgpack.ExtType(7, struct.pack("<QQ", 1, 100)), []], use_bin_type=True)
    assert decode_frame(codec, reply)[REPLY_VALUE] == ("proxy", 1, 100)  # the receiver's side
    back = msgpack.packb([2, msgpack.ExtType(9, struct.pack("<Q", 1)), []], use_bin_type=True)
    assert decode_frame(codec, back)[REPLY_VALUE] is obj
    never_sent = msgpack.packb([2, msgpack.ExtType(9, struct.pack("<Q", 2)), []], use_bin_type=True)
    with pytest.raises(ProtocolError, match="never sent"):
        decode_frame(codec, never_sent)


class _Plain:
    """An object of an ordinary class: it crosses by reference."""


def test_a_reference_reply_is_byte_for_byte_encode_replys_with_the_same_exports():
    """Codec.reference_reply takes only a class the codec has met (encode_reply classifies it
    first) and makes the frame and the exports encode_reply makes."""
    fast_space, slow_space = _Space(), _Space()
    fast, slow = Codec(fast_space), Codec(slow_space)
    first = _Plain()
    assert fast.reference_reply(first) is None and fast_space.exported == []  # not met yet: nothing done
    assert encode_reply(fast, first, []) == encode_reply(slow, first, [])
    second = _Plain()
    assert fast.reference_reply(second) == encode_reply(slow, second, [])
    assert fast_space.exported == slow_space.exported == [first, second]
    assert fast_space.classes == slow_space.classes == [_Plain]
    for value in (1, "x", (1, 2), _Plain, ValueError("e"), sys, None):  # other kinds are encode_reply's
        encode_reply(fast, value, [])
        assert fast.reference_reply(value) is None


def test_a_reference_in_a_reply_is_decode_frames_and_anything_else_is_left_to_it():
    codec = Codec(_Space())
    frame = msgpack.packb([2, msgpack.ExtType(Ext.REF, struct.pack("<QQ", 7, 100)), []], use_bin_type=True)
    assert codec.reference_in_reply(frame) == decode_frame(codec, frame)[REPLY_VALUE] == ("proxy", 7, 100)
    not_references = [
        msgpack.packb([2, msgpack.ExtType(Ext.REF, struct.pack("<QQ", 7, 100)), [[1, 1]]]),  # releases
        msgpack.packb([2, msgpack.ExtType(Ext.BACK, struct.pack("<QQ", 7, 100)), []]),  # another code
        msgpack.packb([1, msgpack.ExtType(Ext.REF, struct.pack("<QQ", 7, 100)), []]),  # another kind
        msgpack.packb([2, msgpack.ExtType(Ext.REF, struct.pack("<QQ", 7, 100)), []])[:-1] + b"\x91",
        msgpack.packb([2, 1, []]),
        b"",
    ]
    for data in not_references:
        assert codec.reference_in_reply(data) is NOT_A_REFERENCE


def test_a_reference_the_space_refuses_is_the_same_protocol_error_on_either_path():
    class Refusing(_Space):
        def proxy(self, handle: int, class_handle: int) -> tuple[str, int, int]:
            raise KeyError(class_handle)  # as a class handle never sent may surface

    codec = Codec(Refusing())
    frame = msgpack.packb([2, msgpack.ExtType(Ext.REF, struct.pack("<QQ", 7, 999)), []], use_bin_type=True)
    with pytest.raises(ProtocolError) as fast:
        codec.reference_in_reply(frame)
    with pytest.raises(ProtocolError) as slow:
        decode_frame(codec, frame)
    assert str(fast.value) == str(slow.value)


class _Undescribable(Exception):
    @property
    def __dict__(self):  # what the codec reads to send an exception's attributes
        raise RuntimeError("no attributes today")


def test_an_exception_that_cannot_travel_arrives_as_a_gate_error_naming_it():
    codec = Codec(_Space())
    frame = decode_frame(codec, encode_error(codec, _Undescribable("x"), [], with_traceback=False))
    exc = frame[ERROR_EXCEPTION]
    assert type(exc) is GateError
    assert str(exc) == "_Undescribable: x (could not be sent: no attributes today)"


def test_modules_cross_by_name_and_builtin_functions_by_reference():
    """A module is its name (MODULE); a builtin class is its name (BUILTIN); a builtin function is
    an object like any other (REF), and a BUILTIN naming one is refused."""
    space = _Space()
    codec = Codec(space)
    assert encode_reply(codec, json, []) == msgpack.packb([2, msgpack.ExtType(13, b"json"), []], use_bin_type=True)
    assert decode_frame(codec, encode_reply(codec, json, []))[REPLY_VALUE] == ("module", "json")
    assert encode_reply(codec, int, []) == msgpack.packb([2, msgpack.ExtType(10, b"int"), []], use_bin_type=True)
    assert decode_frame(codec, encode_reply(codec, len, []))[REPLY_VALUE] == ("proxy", 1, 100)
    assert space.exported == [len]
    for name in (b"eval", b"len", b"open"):
        with pytest.raises(ProtocolError, match="not a class"):
            decode_frame(codec, msgpack.packb([2, msgpack.ExtType(10, name), []], use_bin_type=True))


def test_a_class_sent_as_a_value_is_granted_and_the_class_of_an_object_only_described():
    space = _Space()
    codec = Codec(space)
    encode_reply(codec, [_Undescribable, object()], [])
    assert space.granted == [_Undescribable]  # the object's class (object) is exported, not granted
    assert space.classes == [_Undescribable, object]


def test_an_encoding_that_fails_takes_back_what_it_exported():
    """The peer never gets the handles of a frame that could not be encoded: they are withdrawn,
    and so is a class the frame granted."""
    space = _Space()
    codec = Codec(space)
    frame = sys._getframe()  # never crosses (a cycle did before issue 13: it crosses as a graph now)
    kept, granted = object(), _Undescribable
    with pytest.raises(GateError):
        encode_reply(codec, [kept, granted, frame], [])
    assert space.withdrawn == [1, granted]
    assert encode_reply(codec, "fine", []) == msgpack.packb([2, "fine", []], use_bin_type=True)
    assert space.withdrawn == [1, granted]  # a frame that is sent keeps what it exported


def test_an_exception_record_that_needs_a_second_try_takes_back_the_first():
    space = _Space()
    codec = Codec(space)
    cycle: list = []
    cycle.append(cycle)
    frame = decode_frame(codec, encode_error(codec, ValueError(object(), cycle), [], with_traceback=False))
    exc = frame[ERROR_EXCEPTION]
    assert type(exc) is ValueError and all(type(arg) is str for arg in exc.args)  # sent as reprs
    assert space.withdrawn == [1, 2]  # the first try, and the try of the args alone


def test_flexos_exceptions_from_a_peer_arrive_as_gate_errors_unless_it_is_trusted():
    from flexos.errors import CompartmentCrashed

    for trusted, expected in ((False, GateError), (True, CompartmentCrashed)):
        codec = Codec(_Space(), trusted_peer=trusted)
        frame = decode_frame(codec, encode_error(codec, CompartmentCrashed("db", -9), [], with_traceback=False))
        exc = frame[ERROR_EXCEPTION]
        assert type(exc) is expected and exc.compartment == "db"
        assert "killed by signal 9" in str(exc)


def test_what_msgpack_cannot_pack_goes_to_default():
    """A str with lone surrogates (no UTF-8 for it) and a non-contiguous view, where msgpack raises:
    handed to ``default``, and without one a TypeError, never a half-written frame."""
    seen = []

    def default(obj):
        seen.append(obj)
        return msgpack.ExtType(16, obj.encode("utf-8", "surrogatepass")) if type(obj) is str else obj.tobytes()

    strided = memoryview(b"abcdef")[::2]
    packed = _msgpack.packb(["\ud800", strided], default=default, use_bin_type=True, strict_types=True)
    assert seen == ["\ud800", strided]
    assert _msgpack.unpackb(packed) == [msgpack.ExtType(16, b"\xed\xa0\x80"), b"ace"]
    for value in ("\udfff", strided):
        with pytest.raises(TypeError, match="can not serialize"):
            _msgpack.packb(value)


# -- an exception that goes out and comes back ---------------------------------------------------


def _through(sender: Codec, receiver: Codec, exc: BaseException) -> BaseException:
    """``exc`` as ``receiver`` gets it in an ERROR frame from ``sender``."""
    return decode_frame(receiver, encode_error(sender, exc, [], with_traceback=False))[ERROR_EXCEPTION]


def test_an_exception_raised_back_through_the_peer_is_the_object_that_went_out_with_the_peers_notes():
    app, library = Codec(_Space()), Codec(_Space())
    original = ValueError("original error")
    original.add_note("the app's note")
    replica = _through(app, library, original)
    assert replica is not original and replica.__notes__ == ["the app's note"]
    replica.add_note("the library's note")
    back = _through(library, app, replica)
    assert back is original and app.is_own_exception(back)
    assert original.__notes__ == ["the app's note", "the library's note"]
    assert not app.is_own_exception(_through(library, app, ValueError("the library's own")))


def test_only_the_last_exceptions_sent_come_back_as_themselves():
    app, library = Codec(_Space()), Codec(_Space())
    sent = [ValueError(n) for n in range(KEPT_EXCEPTIONS + 3)]
    replicas = [_through(app, library, exc) for exc in sent]
    back = [_through(library, app, replica) for replica in replicas]
    assert [b is s for b, s in zip(back, sent, strict=True)] == [False] * 3 + [True] * KEPT_EXCEPTIONS
    assert [b.args for b in back] == [s.args for s in sent]  # the forgotten ones arrive as copies


def _record(cls: str, *tokens: object) -> bytes:
    args = msgpack.ExtType(Ext.TUPLE, msgpack.packb(["x"]))
    body = msgpack.packb([msgpack.ExtType(Ext.BUILTIN, cls.encode()), args, {}, "x", *tokens])
    return msgpack.packb([Kind.ERROR, msgpack.ExtType(Ext.EXCEPTION, body), "", []])


def test_a_peer_naming_an_exception_it_was_not_sent_or_under_another_class_gets_a_copy_built():
    app, library = Codec(_Space()), Codec(_Space())
    original = KeyError("k")
    _through(app, library, original)
    (token,) = app._sent_exceptions  # the one token the library was given
    forged_token = decode_frame(app, _record("KeyError", None, token + 1))[ERROR_EXCEPTION]
    other_class = decode_frame(app, _record("ValueError", None, token))[ERROR_EXCEPTION]
    assert type(forged_token) is KeyError and forged_token is not original
    assert type(other_class) is ValueError and not app.is_own_exception(other_class)
    assert decode_frame(app, _record("KeyError", None, token))[ERROR_EXCEPTION] is original


@pytest.mark.parametrize("tokens", [("1", None), (None, 1.5), (None, [1]), (True,)])
def test_malformed_exception_tokens_are_refused(tokens):
    with pytest.raises(ProtocolError):
        decode_frame(Codec(_Space()), _record("KeyError", *tokens))


def test_flexos_own_exception_sent_back_by_an_untrusted_peer_is_a_gate_error_not_the_original():
    """The app's refusal of a compartment's request, raised back through the compartment, is not
    the app's own ProtocolError again: from a compartment, flexos's exceptions arrive as GateError."""
    space = _Space()  # one space: the classes each side describes are the other's
    app, library = Codec(space), Codec(space, trusted_peer=True)
    refusal = ProtocolError("unknown operator '__import__'")
    back = _through(library, app, _through(app, library, refusal))
    assert type(back) is GateError and "unknown operator" in str(back)
