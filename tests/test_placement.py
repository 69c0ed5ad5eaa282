"""Placement across several compartments: siblings, replicated modules, mixed drivers.

Each test writes its own small modules, places them with an Image, and checks where code runs
by comparing process ids.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flexos
from flexos import CompartmentSpec, Image


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Callable[..., flexos.Runtime]]:
    """Write modules into a fresh directory on sys.path and boot an image placing them."""
    runtimes: list[flexos.Runtime] = []
    written: list[str] = []
    sys.path.insert(0, str(tmp_path))

    def _place(modules: dict[str, str], compartments: dict[str, dict], libraries: dict[str, str]) -> flexos.Runtime:
        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
            written.append(name)
        specs = {"app": CompartmentSpec("app", "fcalls", default=True)}
        for name, mechanism in compartments.items():
            options = dict(mechanism)
            specs[name] = CompartmentSpec(name, options.pop("driver"), options)
        runtime = flexos.boot(Image(specs, libraries, source="<test_placement>"))
        runtimes.append(runtime)
        return runtime

    yield _place
    for runtime in runtimes:
        runtime.stop()
    sys.path.remove(str(tmp_path))
    for name in written:
        sys.modules.pop(name, None)


SIBLINGS = {
    "liba": """
        import os
        import libb

        def pids():
            return os.getpid(), libb.pid()

        def relay(callback):
            return libb.apply(callback, 20)
    """,
    "libb": """
        import os

        def pid():
            return os.getpid()

        def apply(callback, value):
            return callback(value) + 1
    """,
}


def test_a_compartment_reaches_a_sibling_compartment(place) -> None:
    """liba (compartment a) imports libb (compartment b): the call goes a -> b, not a -> app."""
    runtime = place(SIBLINGS, {"a": {"driver": "process"}, "b": {"driver": "process"}}, {"liba": "a", "libb": "b"})
    import liba
    import libb

    a_pid, b_pid = liba.pids()
    assert a_pid == runtime.compartments["a"].pid
    assert b_pid == runtime.compartments["b"].pid == libb.pid()
    assert len({os.getpid(), a_pid, b_pid}) == 3


def test_a_callback_travels_through_two_compartments_and_runs_in_the_app(place) -> None:
    place(SIBLINGS, {"a": {"driver": "process"}, "b": {"driver": "process"}}, {"liba": "a", "libb": "b"})
    import liba

    assert liba.relay(lambda value: value + os.getpid()) == 20 + os.getpid() + 1


def test_a_sibling_that_cannot_boot_is_refused_at_once_with_the_reason(place) -> None:
    """The broker's refusal reaches the asking compartment (it does not wait out its timeout)."""
    place(
        SIBLINGS,
        {"a": {"driver": "process"}, "b": {"driver": "process", "start_timeout": 0.001}},
        {"liba": "a", "libb": "b"},
    )
    started = time.monotonic()
    # a's CompartmentStartError, as flexos's own exceptions from a compartment arrive: a GateError
    with pytest.raises(flexos.GateError, match=r"CompartmentStartError.*refused a connection to 'b': .*failed to boot"):
        import liba  # noqa: F401  (liba imports libb, placed in b, which cannot start in 1 ms)
    assert time.monotonic() - started < 30


def test_an_audit_policy_does_not_stop_flexos_reaching_a_sibling(tmp_path) -> None:
    """flexos's own socket use for a gate is not the component's: `deny: [socket]` still lets a
    compartment reach its sibling, and still stops the component's own sockets."""
    for name, source in {**SIBLINGS, "libc_sock": "import socket\n\ndef make():\n    socket.socket()\n"}.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    sys.path.insert(0, str(tmp_path))
    image = Image(
        {
            "app": CompartmentSpec("app", "fcalls", default=True),
            "a": CompartmentSpec("a", "process", hardening={"audit": {"deny": ["socket"]}}, reaches=("b",)),
            "b": CompartmentSpec("b", "process"),
        },
        {"liba": "a", "libc_sock": "a", "libb": "b"},
        source="<test_placement>",
    )
    try:
        with flexos.boot(image):
            import liba
            import libc_sock

            a_pid, b_pid = liba.pids()
            assert len({os.getpid(), a_pid, b_pid}) == 3
            with pytest.raises(PermissionError, match=r"'socket\.__new__' is denied in compartment 'a'"):
                libc_sock.make()
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("liba", "libb", "libc_sock"):
            sys.modules.pop(name, None)


def test_a_sibling_that_dies_is_reached_again_after_its_restart(place) -> None:
    runtime = place(SIBLINGS, {"a": {"driver": "process"}, "b": {"driver": "process"}}, {"liba": "a", "libb": "b"})
    import liba

    first_b = liba.pids()[1]
    os.kill(first_b, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:  # a notices b's death when it next uses the connection
        try:
            second_b = liba.pids()[1]
            break
        except flexos.GateError as crash:  # a's CompartmentCrashed, as flexos's own exceptions from it arrive
            assert crash.compartment == "b"
            assert time.monotonic() < deadline, "compartment b was not restarted"
    assert second_b != first_b
    assert second_b == runtime.compartments["b"].pid


def test_a_strict_fcalls_module_is_reachable_from_a_process_compartment(place) -> None:
    """lc lives in the app's process behind strict gates; la (another process) imports it."""
    place(
        {
            "la": """
                import lc

                def remote_pid():
                    return lc.pid()
            """,
            "lc": """
                import os

                def pid():
                    return os.getpid()
            """,
        },
        {"p": {"driver": "process"}, "s": {"driver": "fcalls", "strict": True}},
        {"la": "p", "lc": "s"},
    )
    import la

    assert la.remote_pid() == os.getpid()


REPLICATED = {
    "rep": """
        counter = 0

        class Thing:
            def value(self):
                return 7

        def bump():
            global counter
            counter += 1
            return counter
    """,
    "lib": """
        import rep

        def thing_class():
            return rep.Thing

        def make_thing():
            return rep.Thing()

        def bump_twice():
            rep.bump()
            return rep.bump()
    """,
}


def test_a_replicated_module_has_its_own_state_in_each_compartment(place) -> None:
    """rep is not listed: the app and compartment box each load their own copy of it."""
    place(REPLICATED, {"box": {"driver": "process"}}, {"lib": "box"})
    import lib
    import rep

    assert rep.bump() == 1
    assert lib.bump_twice() == 2  # box's own counter, untouched by the app's bump
    assert rep.counter == 1


def test_a_replicated_class_arrives_as_the_compartments_class_and_its_instances_still_cross(place) -> None:
    """Not the caller's own rep.Thing: calling it runs box's (a confused deputy otherwise)."""
    place(REPLICATED, {"box": {"driver": "process"}}, {"lib": "box"})
    import lib
    import rep

    assert lib.thing_class() is not rep.Thing and lib.thing_class().__qualname__ == "Thing"
    assert lib.thing_class()().value() == 7  # made in box
    thing = lib.make_thing()  # an instance still crosses by reference
    assert thing.value() == 7


def test_a_forked_app_boots_compartments_of_its_own(place) -> None:
    """After fork() the child must not talk over the parent's channels: it gets its own box."""
    place(
        {"forklib": "import os\n\ndef pid():\n    return os.getpid()\n"},
        {"box": {"driver": "process"}},
        {"forklib": "box"},
    )
    import forklib

    parent_box = forklib.pid()
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a multi-threaded process
        child = os.fork()
    if child == 0:
        try:
            os.write(write_end, str(forklib.pid()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(child, 0)
    child_box = int(answer or 0)
    assert child_box not in (0, parent_box, os.getpid(), child)
    assert forklib.pid() == parent_box  # the parent's compartment is untouched and still answers
