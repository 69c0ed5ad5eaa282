"""A compromised compartment must never get code execution in the app.

The attacker model: code running inside a compartment process (tests/fixtures/hostile.py) that
rewrites flexos's own reply path in that process, so every byte the app reads from it is chosen
by the attacker. The app may see an exception (ProtocolError), never run the attacker's code,
never crash or hang, and must keep working afterwards.

The second half checks the decoder alone, with no processes: flexos.wire.frames.decode_frame
on garbage, truncated and hostile inputs, including random bytes from hypothesis.
"""

from __future__ import annotations

import builtins
import importlib
import os
import pickle

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexos
from flexos.wire.codec import Ext
from flexos.wire.frames import Kind, Op, decode_frame

# -- a compromised compartment ------------------------------------------------------------------

REPLY_ATTACKS = [
    "pickle",
    "pickle-as-value",
    "garbage",
    "garbage-after-header",
    "truncated",
    "empty",
    "unexported-handle",
    "unknown-ext",
    "error-class-eval",
    "error-class-exec",
    "error-class-import",
    "error-not-an-exception",
    "reply-wrong-arity",
    "releases-malformed",
    "describe-dunder-method",
    "describe-unknown-dunder",
    "describe-bad-name",
    "describe-extra-key",
]
# Attacks whose failure mode is a crash of the app: run in a separate app process.
CRASH_ATTACKS = ["deep-array", "deep-tuple"]


@pytest.fixture
def hostile(boot):
    """The hostile library, placed in its own process compartment ``box``."""
    boot("process", {"hostile": "box"})
    return importlib.import_module("hostile")


def test_pickle_payload_is_live(hostile, tmp_path):
    """The pickle the attacker sends really would run code if the app ever unpickled it."""
    marker = tmp_path / "unpickled"
    pickle.loads(hostile.pickle_payload(str(marker)))
    assert marker.exists()


@pytest.mark.parametrize("attack", REPLY_ATTACKS)
def test_crafted_reply_is_rejected(hostile, attack, tmp_path):
    marker = tmp_path / "attacker-code-ran"
    assert hostile.arm(attack, str(marker)) == "armed"
    with pytest.raises(flexos.ProtocolError):
        hostile.echo("y" * 1000)
    assert not marker.exists()
    assert hostile.echo("honest again") == "honest again"


def test_a_serving_thread_that_dies_mid_call_does_not_hang_the_caller(hostile):
    """The compartment stays alive but drops the conversation: the caller is told, promptly."""
    assert hostile.kill_serving_thread() == "armed"
    with pytest.raises(flexos.ProtocolError, match="dropped the call"):
        hostile.echo("never answered")
    assert hostile.echo("honest again") == "honest again"


@pytest.mark.parametrize("attack", ["error-add-note-exec", "error-add-note-exit"])
def test_exception_attributes_cannot_shadow_methods(hostile, attack, tmp_path):
    """An ERROR frame whose attributes name ``add_note`` as builtins exec/exit: flexos adds a note
    to every exception it receives, which must never call what the attacker put there."""
    marker = tmp_path / "attacker-code-ran"
    hostile.arm(attack, str(marker))
    with pytest.raises((flexos.ProtocolError, ValueError)) as info:  # not SyntaxError, not SystemExit
        hostile.echo("x")
    assert not marker.exists()
    assert "add_note" not in vars(info.value)
    assert hostile.echo("honest again") == "honest again"


@pytest.mark.parametrize("attack", REPLY_ATTACKS[:6])
def test_crafted_reply_to_a_callback_is_rejected(hostile, attack, tmp_path):
    """The same, when the crafted bytes answer a call the app makes while serving a callback."""
    marker = tmp_path / "attacker-code-ran"
    outcome = []

    def callback():
        hostile.arm(attack, str(marker))
        try:
            hostile.echo("inner")
        except flexos.ProtocolError:
            outcome.append("rejected")
        return "callback done"

    # The library calls back into the app, which calls the library again: that reply is crafted.
    assert hostile.call(callback) == "callback done"
    assert outcome == ["rejected"]
    assert not marker.exists()
    assert hostile.echo("honest again") == "honest again"


@pytest.mark.parametrize("attack", CRASH_ATTACKS)
def test_deeply_nested_reply_does_not_crash_the_app(attack, run_app):
    done = run_app(
        f"""
        with flexos.boot(IMAGE):
            import hostile
            hostile.arm({attack!r}, "unused")
            try:
                hostile.echo("x")
                print("accepted", flush=True)
            except flexos.ProtocolError:
                print("rejected", flush=True)
            print("alive", hostile.echo("after"), flush=True)
        """,
        libraries={"hostile": "box"},
    )
    assert done.returncode == 0, f"the app died (returncode {done.returncode}):\n{done.stdout}\n{done.stderr}"
    assert done.stdout.splitlines() == ["rejected", "alive after"], done.stdout + done.stderr


def test_repeated_attacks_leave_the_app_working(hostile, tmp_path):
    marker = tmp_path / "attacker-code-ran"
    for attack in ["garbage", "unexported-handle", "error-class-eval", "truncated"] * 5:
        hostile.arm(attack, str(marker))
        with pytest.raises(flexos.ProtocolError):
            hostile.echo("x")
    assert not marker.exists()
    assert hostile.echo([1, (2, 3)]) == [1, (2, 3)]


@pytest.mark.parametrize(
    "name", ["__globals__", "__code__", "__closure__", "__dict__", "__builtins__", "__subclasses__"]
)
def test_compartment_cannot_walk_from_a_callback_to_app_internals(hostile, name):
    def callback():
        return "the app's callback"

    answer = hostile.reach_through(callback, name)
    assert answer.startswith("refused: AttributeError"), answer


class AppService:
    def handle(self):
        return "handled"


@pytest.mark.parametrize("name", ["__self__", "__func__"])
def test_compartment_cannot_walk_from_a_bound_method(hostile, name):
    answer = hostile.reach_through(AppService().handle, name)
    assert answer.startswith("refused: AttributeError"), answer


def test_compartment_cannot_reach_app_modules_through_a_generator_frame(hostile):
    """An app generator handed to a library must not lead to the app's globals (and its os module).

    The attacker also switches off the checks of its own decoder: it owns that process.
    """
    import appside

    answer = hostile.escape_through_generator_frame(appside.numbers(3))
    assert answer != os.getpid(), "the compartment ran os.getpid() inside the app"
    assert isinstance(answer, str) and answer.startswith("refused"), answer


def test_compartment_cannot_import_app_modules(hostile):
    answer = hostile.raw_call(Op.IMPORT, "os")
    assert answer.startswith("refused: ImportError"), answer


@pytest.mark.parametrize(
    ("op", "target", "name"),
    [
        (Op.CALL, 999_999, None),
        (Op.GETATTR, 999_999, "x"),
        (99, 1, None),
        (Op.IMPORT, 12, None),
    ],
    ids=["unexported-handle", "getattr-unexported", "unknown-op", "import-by-int"],
)
def test_compartment_raw_calls_into_the_app_are_refused(hostile, op, target, name):
    answer = hostile.raw_call(op, target, name)
    assert answer.startswith("refused:"), answer
    assert hostile.echo("still fine") == "still fine"


def test_unknown_operator_on_an_app_object_is_refused(hostile):
    """OPERATOR names a key of a fixed table: the peer chooses a key, never a function."""
    answer = hostile.raw_operator(lambda: None, "__import__")
    assert answer.startswith("refused: ProtocolError"), answer


# -- the decoder on its own ---------------------------------------------------------------------


@pytest.fixture
def codec(boot):
    """The app's codec for a strict-fcalls compartment: the real wiring, all in this process."""
    runtime = boot("fcalls-strict")
    return runtime.compartments["box"].link().codec


def _pack(*fields) -> bytes:
    return msgpack.packb(list(fields), use_bin_type=True)


def _ext(code, value) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def _exception(cls_name: bytes, *args) -> msgpack.ExtType:
    return _ext(Ext.EXCEPTION, [msgpack.ExtType(Ext.BUILTIN, cls_name), _ext(Ext.TUPLE, list(args)), {}])


HOSTILE_FRAMES = {
    "empty": b"",
    "one-byte": b"\x93",
    "truncated-header": b"\x93\x02",
    "truncated-str": _pack(Kind.REPLY, "x" * 100, [])[:50],
    "not-an-array": msgpack.packb({"kind": 2}),
    "empty-array": b"\x90",
    "pickle": pickle.dumps(ValueError("pickled")),
    "trailing-bytes": _pack(Kind.REPLY, 1, []) + b"\x00",
    "unknown-kind": _pack(9, 1, []),
    "kind-as-string": _pack("2", 1, []),
    "reply-too-short": _pack(Kind.REPLY, 1),
    "reply-too-long": _pack(Kind.REPLY, 1, [], 4),
    "releases-not-list": _pack(Kind.REPLY, 1, "x"),
    "releases-bad-pair": _pack(Kind.REPLY, 1, [[1]]),
    "releases-non-int": _pack(Kind.REPLY, 1, [["a", 1]]),
    "call-unknown-op": _pack(Kind.CALL, 99, 1, None, [], {}, []),
    "call-op-as-string": _pack(Kind.CALL, "5", 1, None, [], {}, []),
    "call-op-unhashable": _pack(Kind.CALL, [], 1, None, [], {}, []),
    "call-op-float": _pack(Kind.CALL, 5.0, 1, None, [], {}, []),
    "call-bad-target": _pack(Kind.CALL, Op.CALL, [1], None, [], {}, []),
    "call-name-not-str": _pack(Kind.CALL, Op.GETATTR, 1, 5, [], {}, []),
    "call-args-not-list": _pack(Kind.CALL, Op.CALL, 1, None, "args", {}, []),
    "call-kwargs-int-keys": _pack(Kind.CALL, Op.CALL, 1, None, [], {1: 2}, []),
    "error-not-exception": _pack(Kind.ERROR, "boom", "", []),
    "error-traceback-not-str": _pack(Kind.ERROR, _exception(b"ValueError", "x"), 5, []),
    "error-class-eval": _pack(Kind.ERROR, _exception(b"eval", "__import__('os').system('false')"), "", []),
    "error-class-exec": _pack(Kind.ERROR, _exception(b"exec", "raise SystemExit"), "", []),
    "error-class-print": _pack(Kind.ERROR, _exception(b"print", "side effect"), "", []),
    "error-class-private-builtin": _pack(Kind.ERROR, _exception(b"__import__", "os"), "", []),
    "error-record-short": _pack(Kind.ERROR, _ext(Ext.EXCEPTION, [msgpack.ExtType(Ext.BUILTIN, b"ValueError")]), "", []),
    "builtin-unknown": _pack(Kind.REPLY, msgpack.ExtType(Ext.BUILTIN, b"no_such_builtin"), []),
    "builtin-private": _pack(Kind.REPLY, msgpack.ExtType(Ext.BUILTIN, b"__build_class__"), []),
    "builtin-not-ascii": _pack(Kind.REPLY, msgpack.ExtType(Ext.BUILTIN, b"\xff\xfe"), []),
    "back-unexported": _pack(Kind.REPLY, _ext(Ext.BACK, 999_999), []),
    "back-not-int": _pack(Kind.REPLY, _ext(Ext.BACK, "1"), []),
    "ref-unknown-class": _pack(Kind.REPLY, _ext(Ext.REF, [1, 424_242]), []),
    "ref-not-pair": _pack(Kind.REPLY, _ext(Ext.REF, [1]), []),
    "class-unknown": _pack(Kind.REPLY, _ext(Ext.CLASS, 424_242), []),
    "tuple-not-list": _pack(Kind.REPLY, _ext(Ext.TUPLE, {"a": 1}), []),
    "set-unhashable": _pack(Kind.REPLY, _ext(Ext.SET, [[1], [2]]), []),
    "complex-not-floats": _pack(Kind.REPLY, _ext(Ext.COMPLEX, ["1", "2"]), []),
    "ext-garbage-payload": _pack(Kind.REPLY, msgpack.ExtType(Ext.TUPLE, b"\xc1\xc1"), []),
    "ext-unknown": _pack(Kind.REPLY, msgpack.ExtType(99, b"boom"), []),
    "ext-zero": _pack(Kind.REPLY, msgpack.ExtType(0, b""), []),
    "map-unhashable-key": b"\x93\x02\x81\x91\x01\x02\x90",
    "invalid-utf8-str": b"\x93\x02\xa2\xff\xfe\x90",
    "reserved-byte": b"\x93\x02\xc1\x90",
    "deep-array": b"\x93\x02" + b"\x91" * 100_000 + b"\xc0\x90",
    "huge-declared-length": b"\x93\x02\xdb\xff\xff\xff\xff",
}


@pytest.mark.parametrize("data", list(HOSTILE_FRAMES.values()), ids=list(HOSTILE_FRAMES))
def test_decode_frame_rejects_hostile_input(codec, data):
    with pytest.raises(flexos.ProtocolError):
        decode_frame(codec, data)


def test_decode_frame_error_class_must_be_an_exception(codec, tmp_path):
    """An ERROR frame naming a builtin that is not an exception class never calls it."""
    marker = tmp_path / "called"
    frame = _pack(Kind.ERROR, _exception(b"open", str(marker), "w"), "", [])
    with pytest.raises(flexos.ProtocolError):
        decode_frame(codec, frame)
    assert not marker.exists()


def test_decode_frame_accepts_honest_frames(codec):
    """The rejections above are not a decoder that rejects everything."""
    reply = decode_frame(codec, _pack(Kind.REPLY, _ext(Ext.TUPLE, [1, "a"]), []))
    assert _field(reply, 1, "value") == (1, "a")
    error = decode_frame(codec, _pack(Kind.ERROR, _exception(b"KeyError", "k"), "tb", []))
    exc = _field(error, 1, "exception")
    assert type(exc) is KeyError and exc.args == ("k",)


def _field(frame, index, name):
    """A decoded frame's field, whether frames decode to lists or to records."""
    return frame[index] if isinstance(frame, list) else getattr(frame, name)


def test_deeply_nested_extension_types_do_not_crash_the_decoder(run_app):
    """Nested tuples recurse through the ext hook: 5,000 levels must be a ProtocolError.

    Runs in a subprocess: a C stack overflow here would kill the test runner.
    """
    done = run_app(
        """
        import msgpack
        from flexos.wire.frames import decode_frame

        inner = msgpack.packb([])
        for _ in range(5_000):
            inner = msgpack.packb([msgpack.ExtType(1, inner)])
        with flexos.boot(IMAGE) as runtime:
            codec = runtime.compartments["box"].link().codec
            try:
                decode_frame(codec, b"\\x93\\x02" + inner[1:] + b"\\x90")
                print("accepted")
            except flexos.ProtocolError:
                print("rejected")
        """,
        variant="fcalls-strict",
    )
    assert done.returncode == 0, f"the decoder crashed (returncode {done.returncode}):\n{done.stderr}"
    assert done.stdout.strip() == "rejected"


@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_error(codec, data):
    """Or GateError, the refusal of a well-formed reference to something that does not cross
    (a module that is not loaded here)."""
    try:
        decode_frame(codec, data)
    except (flexos.ProtocolError, flexos.GateError):
        pass


@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=1, max_size=256), kind=st.sampled_from([Kind.CALL, Kind.REPLY, Kind.ERROR]))
def test_random_bytes_after_a_valid_header_only_ever_raise_protocol_error(codec, data, kind):
    """Past the first two bytes, so that the decoder's deeper paths are reached too."""
    size = {Kind.CALL: 7, Kind.REPLY: 3, Kind.ERROR: 4}[kind]
    try:
        decode_frame(codec, bytes([0x90 | size, kind]) + data)
    except (flexos.ProtocolError, flexos.GateError):
        pass


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=8)
)


def _ext_of(children):
    return st.one_of(
        st.builds(lambda code, value: _ext(code, value), st.integers(0, 12), children),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
        st.builds(lambda name: msgpack.ExtType(Ext.BUILTIN, name.encode()), st.sampled_from(sorted(dir(builtins)))),
    )


_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=4), children, max_size=3), _ext_of(children)
    ),
    max_leaves=12,
)


@settings(max_examples=2_000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.integers(0, 4), fields=st.lists(_values, max_size=7))
def test_random_structured_frames_only_ever_raise_protocol_error(codec, kind, fields):
    """Well-formed msgpack with flexos's extension types in random places and shapes; or GateError,
    the refusal of a well-formed reference to something that does not cross (a MODULE record
    naming a module that is not loaded here), as for random bytes above."""
    try:
        decode_frame(codec, _pack(kind, *fields))
    except (flexos.ProtocolError, flexos.GateError):
        pass


def test_random_garbage_replies_from_a_live_compartment(hostile):
    """Many rounds of random bytes as replies: each is a ProtocolError, the gate keeps working."""
    for i in range(30):
        hostile.arm("random", f"seed {i}")
        with pytest.raises(flexos.ProtocolError):
            hostile.echo(i)
    assert hostile.echo("ok") == "ok"


# -- one handle named as two kinds of reference ------------------------------------------------


class _ValueStr(str):
    """Stands in for a value proxy of a ``str`` subclass (weakly referenceable)."""


class _ValueInt(int):
    """Stands in for a value proxy of an ``int`` subclass (referenced through an anchor)."""


class _Object:
    """Stands in for an object proxy."""


@pytest.mark.parametrize("value_class", [_ValueStr, _ValueInt])
def test_a_handle_sent_as_an_object_and_as_a_value_never_yields_flexos_internals(value_class) -> None:
    """The peer chooses the handles: naming one as a value after naming it as an object (or the
    other way round) gets the receiver one of the proxies it made, never the anchor behind one."""
    from flexos.gates.handles import ImportTable

    made: list[object] = []

    def make(cls: type) -> object:
        proxy = cls("7") if cls is not _Object else cls()
        made.append(proxy)
        return proxy

    table = ImportTable()
    first = table.lookup_or_create(1, lambda: make(_Object))
    assert table.lookup_or_create_value(1, lambda: make(value_class)) in (first, *made)
    first_value = table.lookup_or_create_value(2, lambda: make(value_class))
    again = table.lookup_or_create(2, lambda: make(_Object))
    assert again is first_value
    assert all(type(proxy) in (_Object, value_class) for proxy in made)


# -- pickling: the app pickles a compartment's objects in their compartment, never the reverse ------


def test_a_compartment_cannot_have_the_app_pickle_or_unpickle(hostile):
    """A pickle holds an object's whole state, and unpickling runs code the bytes name: the app
    pickles a compartment's objects there and has them unpickled there, never the other way round."""
    pickled = hostile.raw_operator(_Object(), "pickle")
    assert pickled.startswith("refused: TypeError") and "may not pickle this side's objects" in pickled, pickled
    unpickled = hostile.raw_call(Op.UNPICKLE, "", None, (pickle.dumps(ValueError("x")),))
    assert unpickled.startswith("refused: TypeError") and "may not have this side unpickle" in unpickled, unpickled
    assert hostile.echo("still fine") == "still fine"
