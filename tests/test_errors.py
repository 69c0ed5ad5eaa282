"""flexos's exceptions: one tree under FlexosError, drawn whole in flexos/errors.py, and each
survives pickle and copy with its full message."""

from __future__ import annotations

import copy
import importlib
import pickle
import pkgutil
import re
import signal
from collections.abc import Callable

import pytest

import flexos
from flexos import errors

EXAMPLES: list[Callable[[], Exception]] = [
    lambda: errors.ConfigError(["flexos.yaml:3: unknown driver 'proces'", "flexos.yaml:9: no default compartment"]),
    lambda: errors.DriverUnavailable("intel-pku needs a CPU with memory protection keys"),
    lambda: errors.ProtocolError("frame is not a flexos frame"),
    lambda: errors.GateError("a self-referencing container cannot cross a gate"),
    lambda: errors.CompartmentStartError("compartment 'db' failed to boot"),
    lambda: errors.HardeningError("filesystem: this kernel does not enforce Landlock"),
    lambda: errors.CompartmentCrashed("db", -signal.SIGKILL, "inside its virtual machine"),
    lambda: errors.CompartmentCrashed("db", 3),
    lambda: errors.CompartmentCrashed("db", None, "the connection to it was lost"),
]
DUPLICATES: list[Callable[[Exception], Exception]] = [
    copy.copy,
    copy.deepcopy,
    lambda error: pickle.loads(pickle.dumps(error)),
]


def flexos_exception_classes() -> dict[str, type[BaseException]]:
    """Every exception and warning class defined at the top of a flexos module, by name."""
    found = {}
    for info in pkgutil.walk_packages(flexos.__path__, "flexos."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__.startswith("flexos"):
                found[value.__name__] = value
    return found


@pytest.mark.parametrize("make", EXAMPLES, ids=lambda make: type(make()).__name__)
@pytest.mark.parametrize("duplicate", DUPLICATES, ids=["copy", "deepcopy", "pickle"])
def test_an_error_keeps_its_message_and_attributes_when_pickled_or_copied(
    make: Callable[[], Exception], duplicate: Callable[[Exception], Exception]
) -> None:
    error = make()
    error.add_note("raised while serving a call")
    again = duplicate(error)
    assert type(again) is type(error)
    assert str(again) == str(error) and again.args == error.args
    assert vars(again) == vars(error)


def test_a_copied_crash_keeps_its_detail() -> None:
    """Regression: __reduce__ rebuilt CompartmentCrashed from (compartment, returncode) alone."""
    crash = errors.CompartmentCrashed("db", -9, "inside its virtual machine")
    assert str(crash) == "compartment 'db' killed by signal 9 (SIGKILL): inside its virtual machine"
    for duplicate in DUPLICATES:
        assert str(duplicate(crash)) == str(crash)
        assert duplicate(crash).detail == "inside its virtual machine"


def test_a_copied_config_error_keeps_its_problems() -> None:
    """Regression: ConfigError was rebuilt from its joined message, which it then split into characters."""
    problems = ["flexos.yaml:3: unknown driver", "flexos.yaml:9: no default"]
    again = pickle.loads(pickle.dumps(errors.ConfigError(problems)))
    assert again.problems == problems
    assert str(again) == "\n".join(problems)


def test_every_flexos_exception_is_a_flexos_error_and_every_warning_a_user_warning() -> None:
    classes = flexos_exception_classes()
    assert {"FlexosError", "HardeningError", "PeerGone", "ConfigWarning"} <= set(classes)
    for name, cls in classes.items():
        assert issubclass(cls, flexos.FlexosError | UserWarning), f"{cls.__module__}.{name}"


def test_the_tree_in_the_errors_docstring_names_every_class() -> None:
    tree = errors.__doc__ or ""
    for name, cls in flexos_exception_classes().items():
        line = re.search(rf"^ *[│├└─ ]*{name}\b.*$", tree, re.MULTILINE)
        assert line, f"{cls.__module__}.{name} is not drawn in flexos/errors.py's docstring"
        if cls.__module__ != "flexos.errors":
            assert f"({cls.__module__})" in line.group(), f"the tree should say {name} lives in {cls.__module__}"


def test_a_remote_traceback_shows_the_compartments_control_characters_as_escapes():
    """The compartment writes the text: a terminal must not act on what it sends (clear the screen,
    reorder what is shown), nor is a newline or tab of a traceback lost."""
    text = str(errors.RemoteTraceback("box", "Traceback\n\tline\x1b[2J\x07\u202eevil\x9b"))
    assert text == "raised in compartment 'box':\n\nTraceback\n\tline\\x1b[2J\\x07\\u202eevil\\x9b"
