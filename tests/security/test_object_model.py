"""What a malicious library could do with each kind of crossing issue 13 added, and that it cannot.

The decoder alone (the app's real codec for a strict-fcalls compartment, fed the bytes a hostile
compartment would send), and a live compartment where the attack needs one.
"""

from __future__ import annotations

import datetime
import decimal
import sys

import msgpack
import pytest
from driver_variants import DRIVER_VARIANTS, needs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexos
from flexos import CompartmentSpec, Image
from flexos.wire.codec import Ext
from flexos.wire.frames import Kind, decode_frame
from flexos.wire.values import BY_WIRE


@pytest.fixture
def codec(boot):
    """The app's codec for a strict-fcalls compartment: the real wiring, all in this process."""
    runtime = boot("fcalls-strict")
    return runtime.compartments["box"].link().codec


def _reply(value) -> bytes:
    return msgpack.packb([Kind.REPLY, value, []], use_bin_type=True)


def _ext(code, value) -> msgpack.ExtType:
    return msgpack.ExtType(code, msgpack.packb(value, use_bin_type=True))


def _value(row, state) -> msgpack.ExtType:
    return _ext(Ext.VALUE, [row, state])


# -- 1: values by value ---------------------------------------------------------------------------

HOSTILE_VALUES = {
    "unknown-row": _value("Popen", ["sh"]),
    "row-not-str": _value(5, [1]),
    "record-short": _ext(Ext.VALUE, ["date"]),
    "date-out-of-range": _value("date", [2020, 13, 1]),
    "date-strings": _value("date", ["2020", "1", "1"]),
    "date-bool": _value("date", [True, 1, 1]),
    "date-wrong-arity": _value("date", [2020, 1]),
    "datetime-tzinfo-not-a-tzinfo": _value("datetime", [2020, 1, 1, 0, 0, 0, 0, "UTC", 0]),
    "datetime-fold-2": _value("datetime", [2020, 1, 1, 0, 0, 0, 0, None, 2]),
    "time-hour-25": _value("time", [25, 0, 0, 0, None, 0]),
    "timedelta-overflow": _value("timedelta", [10**9, 0, 0]),
    "timezone-offset-int": _value("timezone", [3600]),
    "timezone-offset-too-big": _value("timezone", [_value("timedelta", [1, 0, 0])]),
    "decimal-not-a-number": _value("Decimal", ["__import__('os')"]),
    "decimal-not-str": _value("Decimal", [1.5]),
    "ordered-dict-unhashable-key": _value("OrderedDict", [[[1], 2]]),
    "ordered-dict-not-pairs": _value("OrderedDict", [[1, 2, 3]]),
    "slice-wrong-arity": _value("slice", [1, 2]),
    "slice-state-not-list": _value("slice", 5),
    "range-not-ints": _value("range", ["a", 1, 1]),
    "range-bool": _value("range", [True, 1, 1]),
    "range-step-zero": _value("range", [0, 10, 0]),
    "class-by-name-not-listed": msgpack.ExtType(Ext.BUILTIN, b"os.system"),
    "class-by-name-module-only": msgpack.ExtType(Ext.BUILTIN, b"datetime.sys"),
    "surrogates-not-utf8": msgpack.ExtType(Ext.SURROGATES, b"\xff\xfe"),
    "node-outside-graph": msgpack.ExtType(Ext.NODE, b"\x00\x00\x00\x00"),
    "graph-node-out-of-range": _ext(Ext.GRAPH, [msgpack.ExtType(Ext.NODE, b"\x05\x00\x00\x00"), []]),
    "graph-in-graph": _ext(Ext.GRAPH, [_ext(Ext.GRAPH, [1, []]), []]),
    "graph-bad-tag": _ext(Ext.GRAPH, [1, [[7, []]]]),
    "graph-node-not-list": _ext(Ext.GRAPH, [1, ["x"]]),
    "graph-short": _ext(Ext.GRAPH, [1]),
    "graph-unhashable-key": _ext(Ext.GRAPH, [1, [[1, [[msgpack.ExtType(Ext.NODE, b"\x00\x00\x00\x00"), 1]]]]]),
    "graph-node-truncated": _ext(Ext.GRAPH, [msgpack.ExtType(Ext.NODE, b"\x00"), [[0, []]]]),
    "value-ref-short": _ext(Ext.VALUE_REF, [1, 2]),
    "value-ref-not-ints": _ext(Ext.VALUE_REF, ["1", 2, "x"]),
}


@pytest.mark.parametrize("value", list(HOSTILE_VALUES.values()), ids=list(HOSTILE_VALUES))
def test_a_malformed_value_is_a_protocol_error(codec, value):
    """A stdlib value is built only from the row's checked state: anything else is refused."""
    with pytest.raises(flexos.ProtocolError):
        decode_frame(codec, _reply(value))


def test_values_build_only_the_receivers_own_stdlib_types(codec):
    zone = _value("timezone", [_value("timedelta", [0, 3600, 0]), "one"])
    frame = decode_frame(
        codec, _reply([_value("datetime", [2020, 1, 1, 0, 0, 0, 0, zone, 1]), _value("Decimal", ["NaN"])])
    )
    moment, number = frame[1]
    assert type(moment) is datetime.datetime and moment.tzname() == "one" and moment.fold == 1
    assert type(number) is decimal.Decimal and number.is_nan()


@given(
    st.sampled_from(sorted(BY_WIRE)),
    st.lists(
        st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=4), st.none(), st.booleans(), st.floats()), max_size=10
    ),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_value_states_build_their_row_or_are_refused(codec, row, state):
    try:
        value = decode_frame(codec, _reply(_value(row, state)))[1]
    except flexos.ProtocolError:
        return
    assert type(value) is BY_WIRE[row].cls


def test_a_value_reference_must_name_a_class_of_that_value_type(boot):
    """A compartment cannot make the app build a proxy of a class that is no subclass of the value's
    type (a Point 'that is a str'), nor a value proxy out of a plain REF's class."""
    runtime = boot("fcalls-strict")
    import complib

    link = runtime.compartments["box"].link()
    complib.Point(1, 2)  # the app now mirrors Point: a known class handle
    (point_class,) = [handle for handle, cls in link._classes.items() if cls.__name__ == "Point"]
    with pytest.raises(flexos.ProtocolError, match="no subclass of the value's type"):
        decode_frame(link.codec, _reply(_ext(Ext.VALUE_REF, [1, point_class, "a str"])))


# -- 2: subclasses and base-method calls are the app's alone ----------------------------------------

registered: list[str] = []


class Plugin:
    """An app class with a registry a subclass joins when it is made (a plugin system)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        registered.append(cls.__name__)

    def _secret(self):
        return "the app's private method"

    def public(self):
        return "public"


@pytest.fixture(params=["fcalls-strict", "process", pytest.param("subinterp", marks=needs("subinterp"))])
def subthief(request):
    """subthief in compartment box, and caphelpers, an app module, in the default compartment."""
    for name in ("subthief", "caphelpers"):
        sys.modules.pop(name, None)
    engine, options = DRIVER_VARIANTS[request.param]
    specs = {"app": CompartmentSpec("app", "fcalls", default=True), "box": CompartmentSpec("box", engine, options)}
    runtime = flexos.boot(Image(specs, {"subthief": "box", "caphelpers": "app"}, source="<test_object_model>"))
    import subthief

    yield subthief
    runtime.stop()
    for name in ("subthief", "caphelpers"):
        sys.modules.pop(name, None)


def test_a_compartment_cannot_derive_from_a_class_the_app_gave_it(subthief):
    """Deriving would make the app run code at class creation (its __init_subclass__, joining its
    registries) and build a class of the library's choosing: refused, whatever the route."""
    registered.clear()
    with pytest.raises(TypeError, match="may not derive classes"):
        subthief.derive(Plugin)
    with pytest.raises(TypeError, match="may not derive classes"):
        subthief.subclass_raw(Plugin, [["method", "public", print]])
    assert registered == [] and Plugin().public() == "public"


def test_a_compartment_cannot_call_base_methods_on_the_apps_objects(subthief):
    with pytest.raises(TypeError, match="may not call base-class methods"):
        subthief.call_base(Plugin(), Plugin, "_secret")


# -- 8: deleting a module attribute is forwarded, and a compartment still never writes the app's modules


@pytest.mark.parametrize("subthief", ["process", pytest.param("subinterp", marks=needs("subinterp"))], indirect=True)
def test_a_compartment_cannot_delete_from_the_apps_modules(subthief):
    import caphelpers

    with pytest.raises(AttributeError, match="never written through a gate"):
        subthief.delete_from_app_module("check_token")
    assert caphelpers.check_token("x") is not None


# -- 4, 5, 13: operators apply only what the object's class itself offers ------------------------------


class Secretive:
    def __init__(self) -> None:
        self._token = "s3cret"


@pytest.mark.parametrize("subthief", ["process", pytest.param("subinterp", marks=needs("subinterp"))], indirect=True)
def test_operators_reach_only_the_protocols_the_object_offers(subthief):
    """object's own __reduce_ex__ would hand out the whole __dict__ (private state included); an
    object that is not awaitable is not run; a missing operator is an AttributeError."""
    secretive = Secretive()
    with pytest.raises(TypeError, match="does not define __reduce_ex__"):
        subthief.raw_operator(secretive, "reduce_ex", 2)
    with pytest.raises(TypeError, match="can't be used in 'await'"):
        subthief.raw_operator(secretive, "await")
    with pytest.raises(AttributeError, match="__add__"):
        subthief.raw_operator(secretive, "add", 1)
    with pytest.raises(flexos.GateError, match="unknown operator '__import__'"):  # the app's refusal, relayed
        subthief.raw_operator(secretive, "__import__", "os")
    assert secretive._token == "s3cret"


class Fields(tuple):
    """A tuple subclass that is no named tuple: its private names stay private, but for the
    ``_asdict`` protocol it offers (simplejson's, as ``for_json``)."""

    def _asdict(self):
        return {"offered": True}

    def _make(self):
        return "private"


@pytest.mark.parametrize("subthief", ["process", pytest.param("subinterp", marks=needs("subinterp"))], indirect=True)
def test_only_the_named_tuple_api_and_the_asdict_protocol_of_private_names_are_readable(subthief):
    from collections import namedtuple

    span = namedtuple("Span", "start end")(1, 2)
    assert subthief.read(span, "_fields") == ("start", "end")
    assert subthief.read(span, "_asdict")() == {"start": 1, "end": 2}
    for name in ("_make", "_replace"):
        with pytest.raises(AttributeError):
            subthief.read(span, name)
    assert subthief.read(Fields((1,)), "_asdict")() == {"offered": True}
    with pytest.raises(AttributeError, match="private"):
        subthief.read(Fields((1,)), "_make")
    with pytest.raises(AttributeError, match="private"):
        subthief.read(Fields((1,)), "_field_defaults")


_NODES = st.builds(lambda n: msgpack.ExtType(Ext.NODE, n.to_bytes(4, "little")), st.integers(0, 6))
_GRAPH_ITEMS = st.recursive(
    st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=3), _NODES),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.builds(lambda v: _ext(Ext.TUPLE, v), st.lists(children, max_size=3))
    ),
    max_leaves=8,
)
_GRAPH_NODES = st.lists(
    st.one_of(
        st.tuples(st.just(0), st.lists(_GRAPH_ITEMS, max_size=4)).map(list),
        st.tuples(st.just(1), st.lists(st.lists(_GRAPH_ITEMS, min_size=2, max_size=2), max_size=3)).map(list),
        _GRAPH_ITEMS,
    ),
    max_size=5,
)


@given(_GRAPH_ITEMS, _GRAPH_NODES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_graphs_build_containers_or_are_refused(codec, root, nodes):
    """A graph builds lists, dicts and tuples of what it holds, and never leaks a node marker."""
    try:
        value = decode_frame(codec, _reply(_ext(Ext.GRAPH, [root, nodes])))[1]
    except flexos.ProtocolError:
        return
    seen, todo = set(), [value]
    while todo:
        item = todo.pop()
        assert type(item).__name__ != "_Node"
        if isinstance(item, (list, tuple)) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(item)
        elif isinstance(item, dict) and id(item) not in seen:
            seen.add(id(item))
            todo.extend(item.keys())
            todo.extend(item.values())
