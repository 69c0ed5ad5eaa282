"""Any compartment reaches any other, whatever their mechanisms.

For every ordered pair of gated drivers, compartment a (``routea``) imports a module placed in
compartment b (``routeb``) and uses it: a call, an object by reference, a callback into a while b
serves it, an exception; then b dies (or is stopped) while a holds one of its objects. The app
asks a and checks what it says. Process and process connect directly (the app brokers a
socketpair); every other pair goes through the app, which hands a its own gate to the module.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator

import pytest
from driver_variants import DRIVER_VARIANTS, GATED_DRIVERS, needs

import flexos
from flexos import CompartmentSpec, Image
from flexos.wire.control import Route

MODULES = ("routea", "routeb", "routeplace")

# The gated drivers (conftest's), each with its marks (a skip where it cannot run here; vm: slow).
GATED = {
    variant if isinstance(variant, str) else variant.values[0]: [] if isinstance(variant, str) else list(variant.marks)
    for variant in GATED_DRIVERS
}
PAIRS = [
    pytest.param(a, b, id=f"{a}->{b}", marks=[*GATED[a], *(mark for mark in GATED[b] if mark not in GATED[a])])
    for a in GATED
    for b in GATED
]
# Compartments whose death a test can cause and the app survives, and how.
ENDINGS = [
    pytest.param("process", id="process-killed"),
    pytest.param("subinterp", id="subinterp-stopped", marks=needs("subinterp")),
    pytest.param("vm", id="vm-killed", marks=GATED["vm"]),
]


def _image(a: str, b: str, **libraries: str) -> Image:
    specs = {"app": CompartmentSpec("app", "fcalls", default=True)}
    for name, variant in (("a", a), ("b", b)):
        driver, options = DRIVER_VARIANTS[variant]
        specs[name] = CompartmentSpec(name, driver, dict(options))
    return Image(specs, libraries or {"routea": "a", "routeb": "b"}, source=f"<test_routing: {a} -> {b}>")


def _forget_modules() -> None:
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def boot_pair() -> Iterator[Callable[[str, str], flexos.Runtime]]:
    runtimes: list[flexos.Runtime] = []

    def _boot(a: str, b: str) -> flexos.Runtime:
        _forget_modules()
        runtime = flexos.boot(_image(a, b))
        runtimes.append(runtime)
        return runtime

    yield _boot
    for runtime in reversed(runtimes):
        runtime.stop()
    _forget_modules()


def _expected_place(runtime: flexos.Runtime, name: str, variant: str, place: tuple) -> None:
    """``place`` is where compartment ``name`` (driver ``variant``) runs its code."""
    release, pid, interpreter = place
    here = os.uname().release, os.getpid()
    if variant == "vm":
        assert release != here[0] and pid == runtime.compartments[name].driver.guest_pid
    elif variant == "process":
        assert (release, pid, interpreter) == (here[0], runtime.compartments[name].pid, 0)
    elif variant == "subinterp":
        assert (release, pid) == here and interpreter != 0
    else:  # fcalls: the app's own interpreter (strict: behind real gates)
        assert (release, pid, interpreter) == (*here, 0)


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_a_compartment_uses_a_module_of_another(boot_pair, a: str, b: str) -> None:
    runtime = boot_pair(a, b)
    routea = importlib.import_module("routea")
    routeb = importlib.import_module("routeb")  # the app's own gate to b, to compare with
    a_place, b_place = routea.places()
    _expected_place(runtime, "a", a, a_place)
    _expected_place(runtime, "b", b, b_place)
    assert b_place == routeb.place()
    assert a_place != b_place or a == b == "fcalls-strict"

    assert routea.add_in_b(2, 3) == 5  # a call

    counter, value, is_instance = routea.counter_in_b(10)  # an object of b's, by reference
    assert (value, is_instance) == (12, True)
    assert counter.bump(5) == 17  # the app uses it too, a handed it over
    assert counter.value == 17

    assert routea.callback_through_b(20) == (41, a_place, b_place)  # b calls back into a

    assert routea.catch_failure_in_b(7) == ("RouteError", 7)  # b's exception, caught in a by b's class
    with pytest.raises(Exception, match="refused by b") as info:  # ... and as it reaches the app
        routea.failure_in_b(9)
    assert type(info.value).__name__ == "RouteError" and info.value.code == 9


@pytest.mark.parametrize("b", ENDINGS)
@pytest.mark.parametrize("a", [pytest.param(a, marks=marks) for a, marks in GATED.items()])
def test_a_compartment_reaches_another_again_after_it_restarts(boot_pair, a: str, b: str) -> None:
    """b ends while a holds an object of b's: a's next use of that object names b; a's next use of
    b's module reaches b's new instance."""
    runtime = boot_pair(a, b)
    routea = importlib.import_module("routea")
    first_b = routea.places()[1]
    routea.hold(1)
    assert routea.bump_held() == 2
    if b == "subinterp":
        runtime.compartments["b"].stop()  # killing it would kill the app
    else:
        # a reports b's crash: flexos's own exceptions from a compartment arrive as GateError
        with pytest.raises(flexos.GateError, match="CompartmentCrashed") as info:
            routea.crash_b()
        assert info.value.compartment == "b"
    with pytest.raises(flexos.GateError, match="CompartmentCrashed") as info:
        routea.bump_held()
    assert info.value.compartment == "b"
    assert routea.add_in_b(2, 3) == 5
    second_b = routea.places()[1]
    assert second_b != first_b
    _expected_place(runtime, "b", b, second_b)


def test_a_module_of_a_plain_fcalls_compartment_is_handed_over_itself(boot_pair) -> None:
    """fcalls without strict has no gate: the app imports the module and a reaches it in the app."""
    runtime = boot_pair("process", "fcalls")
    routea = importlib.import_module("routea")
    _expected_place(runtime, "b", "fcalls", routea.places()[1])
    assert routea.callback_through_b(1)[0] == 3


@pytest.mark.parametrize(
    ("a", "b", "route"),
    [
        ("process", "process", Route.DIRECT),
        ("process", "subinterp", Route.VIA_APP),
        ("subinterp", "process", Route.VIA_APP),
        ("process", "fcalls-strict", Route.VIA_APP),
        ("process", "fcalls", Route.IN_APP),
        pytest.param("vm", "process", Route.VIA_APP, marks=needs("vm")),
        pytest.param("process", "vm", Route.VIA_APP, marks=needs("vm")),
    ],
)
def test_the_app_routes_each_pair_by_its_drivers_capabilities(a: str, b: str, route: str) -> None:
    """The route table goes into each compartment's boot record; only the app decides it."""
    runtime = flexos.Runtime(_image(a, b))  # not started: nothing boots
    assert runtime.routes_from("a") == {"b": route}


@pytest.mark.parametrize("hardened", ["a", "b"])
def test_a_hardened_compartment_reaches_and_is_reached(run_app, hardened: str) -> None:
    """Hardening binds before a compartment first meets a sibling, which loads flexos code then (the
    sibling driver): flexos's own files stay readable under a filesystem allowlist, wherever flexos
    is installed (here: an editable install, reached through a finder rather than a sys.path entry;
    the app runs from a directory of its own)."""
    from flexos import probe

    if not probe.landlock().available:
        pytest.skip(f"Landlock unavailable here: {probe.landlock().detail}")
    result = run_app(
        f"""
        import os
        from flexos import CompartmentSpec, Image
        policy = {{"filesystem": {{"read": [os.getcwd()], "write": []}}, "env": "clean"}}
        specs = {{"app": CompartmentSpec("app", "fcalls", default=True)}}
        for name in "ab":
            hardening = policy if name == {hardened!r} else {{}}
            specs[name] = CompartmentSpec(name, "process", hardening=hardening, reaches=("b",) if name == "a" else None)
        runtime = flexos.boot(Image(specs, {{"routea": "a", "routeb": "b"}}, source="<hardened pair>"))
        import routea
        print(routea.add_in_b(2, 3), routea.callback_through_b(20)[0])
        runtime.stop()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["5", "41"]
