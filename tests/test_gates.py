"""Everything an app does with a library must work across a gate exactly as without flexos.

Every test runs once per gated driver: ``fcalls`` in strict mode (the full wire encoding,
in-process), ``process`` (a separate OS process over shared memory) and ``subinterp`` (a
subinterpreter of this process). The library, tests/fixtures/complib, knows nothing of flexos.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

import flexos
from flexos.gates.proxies import ModuleProxy


class AppError(Exception):
    """An exception class that belongs to the app, not to the library."""


class AppBox:
    """A plain app object: crosses by reference, so the library's changes are the app's."""


# -- modules ------------------------------------------------------------------------------------


def test_import_gives_a_gate_not_the_module(complib):
    """The app holds a proxy for a module that lives in compartment box."""
    assert isinstance(complib, ModuleProxy)
    assert "box" in repr(complib)


def test_module_function_call(complib):
    assert complib.add(2, 3) == 5
    assert complib.add("gate", "way") == "gateway"


def test_module_constants(complib):
    assert complib.ANSWER == 42
    assert complib.GREETING == "hello"
    assert complib.NAMES == ("ada", "grace")
    assert type(complib.NAMES) is tuple


def test_from_import_of_function(complib):
    from complib import add, greet

    assert add(1, 1) == 2
    assert greet("Ada") == "Hello, Ada!"


def test_module_data_is_read_fresh(complib):
    """A module global changed by the library is seen by the app on the next read."""
    assert complib.counter == 0
    assert complib.bump_counter(5) == 5
    assert complib.counter == 5


def test_module_attribute_assignment_reaches_the_library(complib):
    complib.counter = 10
    assert complib.bump_counter() == 11


def test_missing_module_attribute_is_attribute_error(complib):
    with pytest.raises(AttributeError):
        complib.no_such_name  # noqa: B018
    assert not hasattr(complib, "no_such_name")


def test_dir_of_module_lists_library_names(complib):
    names = dir(complib)
    assert "add" in names and "Point" in names


def test_submodule_import(complib):
    """``import complib.objects`` is a gate too, and reaches the very same classes."""
    import complib.objects as objects
    from complib.errors import LibError

    assert isinstance(objects, ModuleProxy)
    assert objects.Point is complib.Point
    assert LibError is complib.LibError


def test_a_module_crosses_by_name(complib):
    """A module is never sent by reference: each side gets its own module of that name, or its
    own gate to it (here the library's json is its own copy, and complib comes back as our gate)."""
    assert complib.echo(json) is json
    assert complib.echo(complib) is complib
    assert complib.type_name(json) == "module"
    submodule = complib.objects  # an attribute that is a module: our gate to it, not a proxy
    assert isinstance(submodule, ModuleProxy) and submodule.Point is complib.Point


def test_a_builtin_function_crosses_by_reference(complib):
    """len is a callable like any other: the library calls the app's, and it comes back as itself."""
    assert complib.call(len, "abc") == 3
    assert complib.echo(len) is len
    assert complib.echo(int) is int  # builtin classes are the receiver's own, by name


# -- classes ------------------------------------------------------------------------------------


def test_instantiation_and_methods(complib):
    point = complib.Point(3, 4)
    assert point.norm2() == 25
    moved = point.moved(dx=1)
    assert (moved.x, moved.y) == (4, 4)


def test_attribute_get_set_del(complib):
    point = complib.Point(1, 2)
    assert point.x == 1
    point.x = 10
    assert point.x == 10
    assert point.norm2() == 104  # the library sees the new value
    assert point.label == "p"
    del point.label
    with pytest.raises(AttributeError):
        point.label  # noqa: B018
    with pytest.raises(AttributeError):
        point.no_such_attribute  # noqa: B018


def test_property_get_and_set(complib):
    point = complib.Point(3, 4)
    assert point.magnitude == 5.0
    assert point.scaled == 1
    point.scaled = 3
    assert point.scaled == 3


def test_class_attribute(complib):
    assert complib.Point.dimensions == 2
    assert complib.Point3D.dimensions == 3
    assert complib.Point(0, 0).dimensions == 2


def test_classmethod(complib):
    origin = complib.Point.origin()
    assert isinstance(origin, complib.Point)
    assert (origin.x, origin.y) == (0, 0)
    origin3 = complib.Point3D.origin()
    assert type(origin3) is complib.Point3D
    assert origin3.z == 0


def test_staticmethod(complib):
    a, b = complib.Point(0, 0), complib.Point(3, 4)
    assert complib.Point.distance(a, b) == 5.0
    assert a.distance(a, b) == 5.0


def test_inheritance_and_isinstance(complib):
    p3 = complib.Point3D(1, 2, 2)
    assert isinstance(p3, complib.Point3D)
    assert isinstance(p3, complib.Point)
    assert issubclass(complib.Point3D, complib.Point)
    assert not isinstance(complib.Point(1, 2), complib.Point3D)
    assert type(p3) is complib.Point3D
    assert p3.norm2() == 9  # the override
    assert p3.magnitude == 3.0  # an inherited property using the override
    assert p3.moved(dz=1).z == 3


def test_returned_instance_has_the_mirrored_class(complib):
    """An object the library creates is an instance of the same class the app sees."""
    assert type(complib.Point(1, 2).moved()) is complib.Point
    assert type(complib.new_opaque()) is complib.Opaque


# -- dunder protocols ---------------------------------------------------------------------------


def test_len_iter_contains(complib):
    bag = complib.Bag(b=2, a=1)
    assert len(bag) == 2
    assert list(bag) == ["a", "b"]
    assert "a" in bag
    assert "z" not in bag


def test_getitem_setitem_delitem(complib):
    bag = complib.Bag(a=1)
    assert bag["a"] == 1
    bag["c"] = [3]
    assert bag["c"] == [3]
    assert len(bag) == 2
    del bag["a"]
    assert "a" not in bag
    with pytest.raises(KeyError) as info:
        bag["missing"]
    assert info.value.args == ("missing",)


def test_bool_from_bool(complib):
    assert bool(complib.Truthy(True)) is True
    assert bool(complib.Truthy(False)) is False
    assert not complib.Truthy(False)


def test_bool_from_len_only(complib):
    """An object with __len__ but no __bool__ is falsy when empty, as in plain Python."""
    assert bool(complib.Sized(0)) is False
    assert bool(complib.Sized(3)) is True


def test_bool_with_neither_len_nor_bool(complib):
    assert bool(complib.Plain()) is True


def test_call(complib):
    triple = complib.Multiplier(3)
    assert callable(triple)
    assert triple(2) == 6
    assert triple(2, offset=1) == 7


def test_repr_and_str(complib):
    assert repr(complib.Point(1, 2)) == "Point(1, 2)"
    assert str(complib.Point(1, 2)) == "Point(1, 2)"
    bag = complib.Bag(a=1)
    assert repr(bag) == "<Bag of 1>"
    assert str(bag) == "Bag(a=1)"
    assert f"{bag}" == "Bag(a=1)"


def test_context_manager_clean_exit(complib):
    recorder = complib.Recorder()
    with recorder as value:
        assert value == "entered value"
    assert recorder.events == ["enter", "exit clean"]


def test_context_manager_sees_the_exception(complib):
    """__exit__ receives the exception type and instance raised in the app's with block."""
    recorder = complib.Recorder()
    with pytest.raises(ValueError, match="inside"):
        with recorder:
            raise ValueError("inside")
    assert recorder.events == ["enter", "exit ValueError: inside (same type: True)"]


def test_context_manager_can_suppress(complib):
    recorder = complib.Recorder(suppress=True)
    with recorder:
        raise KeyError("swallowed")
    assert recorder.events == ["enter", "exit KeyError: 'swallowed' (same type: True)"]


def test_context_manager_sees_an_app_exception_class(complib):
    recorder = complib.Recorder()
    with pytest.raises(AppError):
        with recorder:
            raise AppError("mine")
    assert recorder.events == ["enter", "exit AppError: mine (same type: True)"]


def test_equality_and_ordering(complib):
    v12, v12b, v20 = complib.Version(1, 2), complib.Version(1, 2), complib.Version(2, 0)
    assert v12 == v12b
    assert v12 != v20
    assert not (v12 != v12b)
    assert v12 < v20
    assert v20 > v12  # reflected __lt__
    assert sorted([v20, v12]) == [v12, v20]
    assert v12 != "not a version"
    with pytest.raises(TypeError):
        v12 < 5  # noqa: B015


def test_hash(complib):
    v12, v12b, v20 = complib.Version(1, 2), complib.Version(1, 2), complib.Version(2, 0)
    assert hash(v12) == hash(v12b) == hash((1, 2))
    assert len({v12, v12b, v20}) == 2
    assert {v12: "found"}[v12b] == "found"


def test_identity_hash_and_unhashable(complib):
    plain = complib.Plain()
    assert hash(plain) == hash(plain)
    assert {plain: 1}[plain] == 1
    with pytest.raises(TypeError):
        hash(complib.Unhashable())


# -- generators and iterators -------------------------------------------------------------------


def test_generator_iteration(complib):
    assert list(complib.count_up(5)) == [0, 1, 2, 3, 4]
    assert sum(complib.count_up(101)) == 5050


def test_generator_send_throw_close(complib):
    gen = complib.echo_generator()
    assert next(gen) == "got None"
    assert gen.send("a") == "got 'a'"
    assert gen.throw(ValueError("boom")) == "got 'caught boom'"
    assert complib.closed_generators == []
    gen.close()
    assert complib.closed_generators == ["echo"]
    with pytest.raises(StopIteration):
        next(gen)


def test_generator_throw_uncaught_propagates(complib):
    gen = complib.echo_generator()
    next(gen)
    with pytest.raises(KeyError):
        gen.throw(KeyError("not caught"))


def test_iterator_class(complib):
    assert list(complib.Countdown(3)) == [3, 2, 1]
    countdown = iter(complib.Countdown(1))
    assert next(countdown) == 1
    with pytest.raises(StopIteration):
        next(countdown)


def test_library_consumes_an_app_generator(complib):
    """An app generator crosses by reference; the library pulls values from it via the gate."""
    assert complib.sum_from(i * i for i in range(10)) == 285


# -- arguments ----------------------------------------------------------------------------------


def test_kwargs_and_defaults(complib):
    assert complib.greet("Ada") == "Hello, Ada!"
    assert complib.greet("Ada", "Hi") == "Hi, Ada!"
    assert complib.greet(name="Ada", punct="?") == "Hello, Ada?"
    assert complib.greet("Ada", "Hi", "x", "y", punct=".", z=1, a=2) == "Hi, Ada.xy a=2 z=1"


def test_bad_arguments_raise_type_error(complib):
    with pytest.raises(TypeError):
        complib.add(1)
    with pytest.raises(TypeError):
        complib.add(1, 2, c=3)


# -- callbacks ----------------------------------------------------------------------------------


def test_callback_runs_in_the_app(complib, library_pid):
    """A function the app passes is called by the library but runs in the app's process."""
    report = complib.call_and_report(os.getpid)
    assert report == {"library_pid": library_pid, "callback_result": os.getpid()}


def test_callback_with_arguments_and_kwargs(complib):
    def combine(a, b, *, sep):
        return f"{a}{sep}{b}"

    assert complib.call(combine, "x", "y", sep="+") == "x+y"


def test_reentrant_callbacks(complib, library_pid):
    """app -> library -> app -> library ... nested 13 deep, each side in its own process."""

    def bounce(depth, trail):
        trail = (*trail, ("app", os.getpid()))
        return complib.ping_pong(depth, bounce, trail)

    trail = complib.ping_pong(6, bounce)
    sides = [side for side, _ in trail]
    assert sides == ["library", "app"] * 6 + ["library"]
    for side, pid in trail:
        assert pid == (library_pid if side == "library" else os.getpid())


def test_callback_exception_crosses_two_gates(complib):
    """An exception raised in an app callback reaches the app through the library unchanged."""

    def fail():
        raise ValueError("from the app callback")

    with pytest.raises(ValueError, match="from the app callback"):
        complib.call(fail)


def test_app_exception_class_crosses_two_gates(complib):
    """The app's own exception class comes back as itself, not as a mirror."""

    def fail():
        raise AppError("mine", 7)

    with pytest.raises(AppError) as info:
        complib.call(fail)
    assert type(info.value) is AppError
    assert info.value.args == ("mine", 7)


# -- exceptions ---------------------------------------------------------------------------------


def test_builtin_exception_arrives_as_itself(complib):
    with pytest.raises(ValueError) as info:
        complib.raise_value_error("bad value")
    assert type(info.value) is ValueError
    assert info.value.args == ("bad value",)


def test_key_error_keeps_its_key(complib):
    with pytest.raises(KeyError) as info:
        complib.raise_key_error(("composite", 1))
    assert info.value.args == (("composite", 1),)


def test_file_not_found_keeps_errno(complib, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError) as info:
        complib.open_missing(str(missing))
    assert type(info.value) is FileNotFoundError
    assert isinstance(info.value, OSError)
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == os.strerror(errno.ENOENT)


def test_file_not_found_keeps_filename(complib, tmp_path):
    """OSError.filename is part of the exception as the app would see it without flexos."""
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError) as info:
        complib.open_missing(str(missing))
    assert info.value.filename == str(missing)


def test_library_exception_class_can_be_caught(complib):
    try:
        complib.raise_lib_error("it broke", 17)
    except complib.LibError as exc:
        assert type(exc) is complib.LibError
        assert exc.args == ("it broke", 17)
        assert exc.code == 17
        assert exc.detail == {"message": "it broke", "code": 17}
    else:
        pytest.fail("LibError was not raised")


def test_library_exception_hierarchy(complib):
    with pytest.raises(complib.LibError) as info:
        complib.raise_not_found("widget")
    assert type(info.value) is complib.NotFound
    assert issubclass(complib.NotFound, complib.LibError)
    assert info.value.name == "widget"
    assert info.value.code == 404
    assert str(info.value) == str(("widget not found", 404))


def test_library_exception_that_is_also_a_builtin(complib):
    """BadInput(LibError, ValueError) is caught by either base."""
    with pytest.raises(ValueError) as info:
        complib.raise_bad_input("age")
    assert isinstance(info.value, complib.LibError)
    assert isinstance(info.value, complib.BadInput)
    assert info.value.field == "age"


def test_stdlib_exception_class_can_be_caught(complib):
    """json is not placed anywhere (each side has its own copy): the app catches its own class."""
    with pytest.raises(json.JSONDecodeError) as info:
        complib.parse_json("{broken")
    assert info.value.pos == 1


def test_exception_class_is_stable_across_calls(complib):
    errors = []
    for _ in range(2):
        try:
            complib.raise_lib_error("x", 1)
        except complib.LibError as exc:
            errors.append(type(exc))
    assert errors[0] is errors[1] is complib.LibError


def test_the_remote_traceback_is_the_cause_and_the_notes_stay_the_librarys(complib):
    with pytest.raises(RuntimeError) as info:
        complib.raise_in_library_frame()
    cause = info.value.__cause__
    assert isinstance(cause, flexos.RemoteTraceback) and cause.compartment == "box"
    assert "_deep_library_frame" in cause.text and "raised deep inside the library" in cause.text
    assert "complib" in cause.text.splitlines()[1]  # it starts at the library's frame, not the gate's
    assert not hasattr(info.value, "__notes__")
    assert info.value.__suppress_context__


# -- identity -----------------------------------------------------------------------------------


def test_same_remote_object_same_proxy(complib):
    assert complib.singleton() is complib.singleton()


def test_proxy_passed_back_is_the_original(complib):
    assert complib.is_singleton(complib.singleton()) is True
    assert complib.is_singleton(complib.new_opaque()) is False


def test_app_object_comes_back_as_itself(complib):
    box = AppBox()
    assert complib.echo(box) is box


def test_app_object_is_passed_by_reference(complib):
    box = AppBox()
    assert complib.set_attribute(box, "value", 5) == 5
    assert box.value == 5


def test_library_object_is_passed_by_reference(complib):
    point = complib.Point(1, 2)
    assert complib.set_attribute(point, "x", 9) == 9
    assert point.x == 9


# -- data crossing rules ------------------------------------------------------------------------

BY_VALUE = [
    pytest.param(None, id="none"),
    pytest.param(True, id="bool"),
    pytest.param(-7, id="int"),
    pytest.param(2**64 - 1, id="u64"),
    pytest.param(2**64 + 1, id="big-int"),
    pytest.param(-(2**100), id="big-negative-int"),
    pytest.param(10**400, id="huge-int"),
    pytest.param(1.5, id="float"),
    pytest.param(complex(1.5, -2), id="complex"),
    pytest.param("naïve ✓", id="str"),
    pytest.param(b"\x00\xffbytes", id="bytes"),
    pytest.param((1, "a", (2, (3,))), id="tuple"),
    pytest.param((), id="empty-tuple"),
    pytest.param([1, [2, [3]]], id="list"),
    pytest.param({1, 2, 3}, id="set"),
    pytest.param(frozenset({"a", "b"}), id="frozenset"),
    pytest.param({"a": [1, (2, 3)], "b": {4, 5}, (1, 2): frozenset({1})}, id="nested-dict"),
    pytest.param({1: "int key", None: "none key"}, id="non-str-keys"),
]


def _same_structure(a, b) -> bool:
    """Equal, and of the same type all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_structure(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_structure(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize("value", BY_VALUE)
def test_value_round_trip_keeps_type(complib, value):
    result = complib.echo(value)
    assert _same_structure(result, value), (result, value)


@pytest.mark.parametrize("value", BY_VALUE)
def test_library_receives_the_same_type(complib, value):
    assert complib.type_name(value) == type(value).__name__


@pytest.mark.parametrize("value", [bytearray(b"array"), memoryview(b"view")], ids=["bytearray", "memoryview"])
def test_bytes_like_values_keep_their_type(complib, value):
    """bytearray arrives as a bytearray the receiver owns, memoryview as a read-only view of the
    receiver's own copy, both ways."""
    assert complib.type_name(value) == type(value).__name__
    back = complib.echo(value)
    assert type(back) is type(value) and bytes(back) == bytes(value)
    if type(back) is memoryview:
        assert back.readonly


@pytest.mark.parametrize("size", [(64 << 10) - 1, 64 << 10, (64 << 10) + 1, 3 << 20])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_buffers_around_the_bulk_threshold_keep_type_and_contents(complib, driver, kind, size):
    data = kind(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    back = complib.echo(data)
    assert bytes(back) == bytes(data) and len(back) == size
    if driver != "subinterp" or size < 64 << 10:  # subinterp lends large buffers as read-only views
        assert type(back) is kind


def test_returned_list_is_a_copy(complib):
    """Mutating a container the library returned does not change the library's own."""
    before = complib.kept_list_snapshot()
    kept = complib.kept_list()
    assert kept == [1, [2, 3], {"k": [4]}]
    kept.append(99)
    kept[1].append(4)
    kept[2]["k"].clear()
    assert complib.kept_list_snapshot() == before
    assert complib.kept_list() == [1, [2, 3], {"k": [4]}]


def test_passed_list_is_a_copy(complib):
    mine = [1, 2]
    assert complib.append_and_return(mine, 3) == [1, 2, 3]
    assert mine == [1, 2]


def test_nested_containers_of_moderate_depth(complib):
    value: object = "leaf"
    for level in range(60):
        value = [value] if level % 2 else (value, level)
    assert complib.echo(value) == value


def test_objects_inside_containers_go_by_reference(complib):
    box = AppBox()
    point = complib.Point(1, 2)
    result = complib.echo({"app": [box], "lib": (point,)})
    assert result["app"][0] is box
    assert result["lib"][0] is point


def test_cyclic_list_crosses_as_a_cycle(complib):
    """Issue 13 item 10: a cycle used to raise GateError; it crosses as a graph now."""
    cycle: list = []
    cycle.append(cycle)
    back = complib.echo(cycle)
    assert type(back) is list and back[0] is back and back is not cycle
    assert complib.add(1, 1) == 2  # and the gate still works


def test_cyclic_dict_crosses_as_a_cycle(complib):
    cycle: dict = {}
    cycle["self"] = cycle
    back = complib.echo(cycle)
    assert back["self"] is back


def test_cycle_through_a_tuple_crosses_as_a_cycle(complib):
    """A cycle that passes through a tuple (an extension type on the wire) is still a cycle."""
    cycle: list = []
    cycle.append((cycle,))
    back = complib.echo(cycle)
    assert type(back[0]) is tuple and back[0][0] is back
    assert complib.add(1, 1) == 2


def test_cyclic_return_value_crosses_as_a_cycle(complib):
    back = complib.make_cycle()
    assert back[0] is back
    assert complib.add(1, 1) == 2


def test_deeply_nested_tuples_do_not_crash(driver, run_app):
    """A legitimately deep value either crosses or raises GateError; neither side may crash.

    Runs the app in a subprocess, because a crash here would take the test runner with it.
    """
    done = run_app(
        """
        with flexos.boot(IMAGE):
            import complib
            for depth in (100, 300, 1000):
                value = ()
                for _ in range(depth):
                    value = (value,)
                try:
                    print(depth, "ok" if complib.echo(value) == value else "WRONG", flush=True)
                except flexos.GateError:
                    print(depth, "GateError", flush=True)
            print("alive", complib.add(1, 1), flush=True)
        """,
        variant=driver,
    )
    assert done.returncode == 0, f"the app died (returncode {done.returncode}):\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    for depth in (100, 300, 1000):
        assert f"{depth} ok" in lines or f"{depth} GateError" in lines, done.stdout + done.stderr
    assert "alive 2" in lines
