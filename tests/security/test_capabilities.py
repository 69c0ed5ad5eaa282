"""The capability policy: a compartment reaches only what it was given (issue 12, items 1-5, 13, 14).

The hostile library tests/fixtures/capthief.py sits in compartment ``box``; caphelpers, an app
module, is placed in the default compartment, where box may import it. Each test hands capthief
some references, lets it try to turn them into more (code run in the app, a rewritten class or
module, a private attribute, an object the app never sent), asserts the specific denial, and then
checks that the app is healthy: its objects, classes and modules unchanged, the gate answering.
Each runs under ``process`` and ``subinterp``, and under strict ``fcalls`` where the attack goes
through a gate there too (a strict fcalls library runs in the app's interpreter, so its own
``import caphelpers`` is the app's module itself: no gate to attack).
"""

from __future__ import annotations

import builtins
import enum
import functools
import importlib
import json
import os
import subprocess
import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path

import pytest
from driver_variants import DRIVER_VARIANTS, needs

import flexos
from flexos import CompartmentSpec, Image
from flexos.gates.link import Link
from flexos.gates.proxies import ModuleFunction, RemoteClass

MODULES = ("capthief", "caphelpers", "capstar")
IN_PROCESS_GATES = "fcalls-strict"
SUBINTERP = pytest.param("subinterp", marks=needs("subinterp"))
ALL_DRIVERS = [IN_PROCESS_GATES, "process", SUBINTERP]
SEPARATE_INTERPRETERS = ["process", SUBINTERP]


def _forget_modules() -> None:
    for name in MODULES:
        sys.modules.pop(name, None)


@pytest.fixture(params=ALL_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def runtime(driver: str) -> Iterator[flexos.Runtime]:
    """capthief and capstar in compartment box (driver ``driver``), caphelpers in the app."""
    _forget_modules()
    engine, options = DRIVER_VARIANTS[driver]
    specs = {
        "app": CompartmentSpec("app", "fcalls", default=True),
        "box": CompartmentSpec("box", engine, dict(options)),
    }
    libraries = {"capthief": "box", "capstar": "box", "caphelpers": "app"}
    dispatch, check = Link.dispatch, getattr(sys.modules["flexos.gates.link"], "checked_attribute", None)
    runtime = flexos.boot(Image(specs, libraries, source=f"<test_capabilities: {driver}>"))
    yield runtime
    runtime.stop()
    _forget_modules()
    Link.dispatch = dispatch  # a strict fcalls attacker shares our interpreter: undo what it rewrote
    if check is not None:
        sys.modules["flexos.gates.link"].checked_attribute = check  # type: ignore[attr-defined]


@pytest.fixture
def capthief(runtime: flexos.Runtime):
    return importlib.import_module("capthief")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "code-ran-in-the-app"


def _code(marker: Path) -> str:
    """What the attacker wants run in the app: it leaves ``marker`` with the pid that ran it."""
    return f"open({str(marker)!r}, 'w').write(str(__import__('os').getpid()))"


def _healthy(capthief) -> None:
    """The gate still answers, both ways."""
    assert capthief.echo([1, (2, "three")]) == [1, (2, "three")]
    assert capthief.call(lambda x: x * 2, 21) == 42


# -- app-side objects the tests hand over -------------------------------------------------------------


class Service:
    def handle(self):
        return "handled"


class User:
    def __init__(self, name: str, password: str) -> None:
        self.name = name
        self._password_hash = hash(password)
        self.__salt = "pepper"

    def check_password(self, password: str) -> bool:
        return hash(password) == self._password_hash

    def _rotate(self) -> str:
        return self.__salt


class AppBox:
    """A plain object: the library may set and delete its public data attributes."""


class AppEncoder:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def encode(self, value) -> str:
        return self.prefix + json.dumps(value)


class AppError(Exception):
    pass


class Secret:
    def __repr__(self) -> str:
        return "SECRET-7f3a"


Point = namedtuple("Point", "x y")


class Color(enum.Enum):
    RED = 1
    GREEN = 2


# -- 1: classes the app did not pass are describe-only ------------------------------------------------


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param(lambda lib, code: lib.forge_method(Service().handle, code), id="bound-method"),
        pytest.param(lambda lib, code: lib.forge_method_of(Service(), "handle", code), id="instance-with-a-method"),
        pytest.param(lambda lib, code: lib.forge_partial(functools.partial(len, "abc"), code), id="partial"),
    ],
)
def test_a_class_reached_through_type_cannot_be_called(capthief, marker, attack) -> None:
    """type(bound_method)(eval, CODE)() would build types.MethodType(eval, CODE) in the app and run it."""
    answer = attack(capthief, _code(marker))
    assert answer.startswith("refused: TypeError:") and "not granted" in answer, answer
    assert not marker.exists(), f"the library's code ran in pid {marker.read_text()}"
    assert Service().handle() == "handled"
    _healthy(capthief)


def test_classes_of_namedtuples_and_enum_members_are_describe_only(capthief) -> None:
    point, red = Point(1, 2), Color.RED
    for obj, args in ((point, (3, 4)), (red, (2,))):
        answer = capthief.call_type_of(obj, *args)
        assert answer.startswith("refused: TypeError:") and "not granted" in answer, answer
    for obj, name in ((point, "_make"), (point, "x"), (red, "GREEN")):
        answer = capthief.read_type_attribute(obj, name)
        assert answer.startswith("refused: AttributeError:"), answer
    # ... while what the objects themselves offer keeps working, and so does matching by class
    assert capthief.read_attribute(point, "x") == "done: 1"
    assert capthief.read_attribute(red, "name") == "done: 'RED'"
    assert capthief.call_method(point, "count", 2) == "done: 1"
    assert capthief.same_class(point, Point(3, 4)) == (True, True)
    assert capthief.same_class(red, Color.GREEN) == (True, True)

    def fail():
        raise AppError("from the app")

    assert capthief.catch_like(fail, AppError("a sample")) == "caught AppError: from the app"
    assert Point._make([5, 6]) == (5, 6) and Color(2) is Color.GREEN
    _healthy(capthief)


def test_a_class_the_app_passes_is_granted(capthief) -> None:
    """cls=AppEncoder is a capability the app granted: the library instantiates and uses it."""
    assert capthief.use_granted_class(AppEncoder, "json:") == "done: 'json:{\"granted\": true}'"
    assert capthief.call_type_of(AppEncoder("x"), "y").startswith("done: ")  # granted once: granted


def test_a_partials_function_is_not_handed_out(capthief, marker) -> None:
    """A callback is call-only: partial(f, arg).func would be f, callable with any argument."""
    answer = capthief.reach_partial_function(functools.partial(eval, "1 + 1"))
    assert answer.startswith("refused: AttributeError:"), answer
    assert capthief.call(functools.partial(len, "abc")) == 3  # the partial itself: call it
    _healthy(capthief)


# -- 2: only inert values resolve to the receiver's own objects by name -------------------------------


def test_a_callable_owned_by_the_compartment_stays_a_proxy_that_runs_there(capthief, driver, marker) -> None:
    """``loads = eval`` must not arrive as the app's own eval (a confused deputy)."""
    library = capthief.where()
    assert capthief.loads is not eval and isinstance(capthief.loads, ModuleFunction)
    assert capthief.parser() is not eval
    if driver != IN_PROCESS_GATES:  # one interpreter: the app cannot tell where an eval ran
        assert capthief.loads(capthief.WHERE) == library != (os.getpid(), 0)
        assert capthief.parser()(capthief.WHERE) == library
    capthief.loads(_code(marker))  # the app "parses" untrusted text: the eval runs in the compartment
    assert int(marker.read_text()) == library[0]
    assert capthief.Number is int  # an inert builtin class is the receiver's own
    _healthy(capthief)


def test_a_class_of_an_unlisted_module_stays_the_compartments(capthief, driver) -> None:
    """``Document = subprocess.Popen`` is not the app's Popen: calling it runs in the compartment."""
    document = capthief.Document
    assert document is not subprocess.Popen
    assert isinstance(document, RemoteClass) and document.__qualname__ == "Popen"
    if driver == "process":
        child = document([sys.executable, "-c", "import os; print(os.getppid())"], stdout=subprocess.PIPE)
        assert int(child.communicate()[0]) == capthief.pid() != os.getpid()
    _healthy(capthief)


# -- 3: from lib import * -------------------------------------------------------------------------------


def test_star_import_binds_only_public_names(runtime, marker) -> None:
    namespace: dict = {}
    exec("from capstar import *\ndef to_number(text):\n    return int(text)\n", namespace)
    assert namespace["__builtins__"] is builtins.__dict__
    assert "_hook" not in namespace
    assert namespace["parse"]("a,b") == ["a", "b"]
    assert namespace["to_number"]("12") == 12
    with pytest.raises(ValueError):
        namespace["to_number"](_code(marker))
    assert not marker.exists()


# -- 4: modules never cross by reference ----------------------------------------------------------------


@pytest.mark.parametrize("driver", SEPARATE_INTERPRETERS, indirect=True)
def test_a_module_attribute_is_the_receivers_own_module(capthief, driver) -> None:
    """caphelpers.json.decoder.re.enum.sys.modules["os"] must be the compartment's os, not the app's."""
    assert capthief.app_module_attribute_kind() == ("module", "json")
    assert capthief.walk_app_module() == f"done: (('module', 'os'), {capthief.pid()})"
    _healthy(capthief)


@pytest.mark.parametrize("driver", SEPARATE_INTERPRETERS, indirect=True)
def test_a_module_passed_as_an_argument_arrives_by_name(capthief, driver) -> None:
    import caphelpers

    assert capthief.module_kind(caphelpers) == ("module", "caphelpers")  # its gate to the app's module
    assert capthief.module_kind(json) == ("module", "json")  # its own json
    assert capthief.walk_module(caphelpers) == f"done: (('module', 'os'), {capthief.pid()})"
    assert capthief.echo(json) is json and capthief.echo(caphelpers) is caphelpers  # and back, by name
    _healthy(capthief)


# -- 5: what a compartment may change ---------------------------------------------------------------


def test_classes_cannot_be_rewritten(capthief) -> None:
    user = User("ada", "right")
    check_password = User.check_password
    for answer in (
        capthief.rewrite_class_of(user),  # through type(user): not even granted
        capthief.rewrite_class(User),  # a class the app passed: granted, still not writable
        capthief.delete_from_class(User, "check_password"),
    ):
        assert answer.startswith("refused: "), answer
    assert capthief.shadow_method(user).startswith("refused: AttributeError:")  # nor per instance
    assert User.check_password is check_password
    assert user.check_password("wrong") is False and user.check_password("right") is True
    assert "check_password" not in vars(user)
    _healthy(capthief)


def test_public_data_attributes_of_given_objects_stay_writable(capthief) -> None:
    box, user = AppBox(), User("ada", "right")
    assert capthief.set_attribute(box, "value", 5) == "done: None"
    assert box.value == 5
    assert capthief.delete_attribute(box, "value") == "done: None"
    assert not hasattr(box, "value")
    assert capthief.set_attribute(user, "name", "grace") == "done: None"
    assert user.name == "grace"


def test_private_attributes_of_app_objects_are_refused(capthief) -> None:
    user = User("ada", "right")
    for answer in (
        capthief.read_attribute(user, "_password_hash"),
        capthief.read_attribute(user, "_User__salt"),  # name-mangled
        capthief.call_method(user, "_rotate"),
        capthief.set_attribute(user, "_password_hash", hash("mine")),
        capthief.delete_attribute(user, "_password_hash"),
    ):
        assert answer.startswith("refused: AttributeError:") and "private" in answer, answer
    assert user.check_password("right") is True
    assert capthief.read_attribute(user, "name") == "done: 'ada'"
    assert capthief.call_method(user, "check_password", "right") == "done: True"


@pytest.mark.parametrize("driver", SEPARATE_INTERPRETERS, indirect=True)
def test_an_app_module_cannot_be_patched_by_a_compartment(capthief) -> None:
    import caphelpers

    answer = capthief.patch_app_module()
    assert answer.startswith("refused: AttributeError:"), answer
    assert caphelpers.check_token("anything") is False and caphelpers.check_token("s3cret") is True
    _healthy(capthief)


# -- 14: flexos's own exceptions cannot be forged -------------------------------------------------------


@pytest.mark.parametrize("kind", ["crashed", "subclass", "protocol", "base"])
def test_flexos_exceptions_cannot_be_forged(capthief, kind) -> None:
    try:
        capthief.raise_forged(kind)
    except (flexos.CompartmentCrashed, flexos.ProtocolError) as forged:
        pytest.fail(f"the compartment raised flexos's own {type(forged).__name__} in the app")
    except flexos.GateError as arrived:
        assert type(arrived) is flexos.GateError
        assert "forged by capthief" in str(arrived)
    forged_value = capthief.return_forged()
    assert type(forged_value) is flexos.GateError
    _healthy(capthief)


def test_objects_of_an_exception_that_failed_to_encode_are_released(runtime, capthief) -> None:
    """The app's error carries an object and a value that cannot cross: the first try at sending it
    exported the object; the handle must not stay behind for the library to guess."""
    cycle: list = []
    cycle.append(cycle)

    def fail():
        raise AppError(Secret(), cycle)

    exports = runtime.compartments["box"].link().exports
    found = capthief.guess_handles(AppBox(), fail, 200)
    assert not [text for text in found if "SECRET" in str(text)], found
    assert not [obj for obj, _ in exports.objects.values() if isinstance(obj, Secret)]
    _healthy(capthief)


def test_objects_of_a_reply_that_failed_to_encode_are_released(runtime, capthief) -> None:
    # A frame never crosses (a cycle did not, before issue 13: it crosses as a graph now).
    exports = runtime.compartments["box"].link().exports
    found = capthief.guess_handles(AppBox(), lambda: [Secret(), sys._getframe()], 200)
    assert not [text for text in found if "SECRET" in str(text)], found
    assert not [obj for obj, _ in exports.objects.values() if isinstance(obj, Secret)]
    _healthy(capthief)


# -- 13: a bound on the handles a compartment holds ------------------------------------------------------


def test_a_compartment_holding_too_many_handles_is_refused_more(runtime, capthief) -> None:
    capthief.echo(1)  # booted, and its link made
    exports = runtime.compartments["box"].link().exports
    exports.limit = 40
    answer = capthief.hoard(AppBox, 100)
    assert answer.startswith("refused after 40: TooManyHandles:") and "as many as it may" in answer, answer
    assert sum(isinstance(obj, AppBox) for obj, _ in exports.objects.values()) == 40
    with pytest.raises(flexos.GateError, match="holds"):  # nor can the app hand it more
        capthief.echo(AppBox())
    assert capthief.echo("values still cross") == "values still cross"
    assert capthief.let_go() == "released"
    capthief.echo(1)  # carries its releases
    assert capthief.hoard(AppBox, 10) == "done: 10"
