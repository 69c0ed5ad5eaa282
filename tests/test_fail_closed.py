"""What flexos.yaml says is what runs (issue 14): a placement that would silently not isolate is
gated or refused, never accepted."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flexos
from flexos import CompartmentSpec, ConfigError, Image
from flexos.config import app_path, parse

FLEXOS = Path(sys.executable).parent / "flexos"

# Loaded by flexos's own start-up (CLI, config stack, runtime) before any gate exists.
PRE_IMPORTED = (
    "json re zlib zipfile email struct base64 binascii decimal datetime fractions socket subprocess uuid "
    "hashlib lzma bz2 ast difflib ctypes msgpack ruamel.yaml pydantic click"
).split()


def box_yaml(modules: list[str], extra: str = "") -> str:
    placed = "".join(f"  {module}: {{compartment: box}}\n" for module in modules)
    return textwrap.dedent(
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
        """
    ) + (extra + "libraries:\n" + placed)


def test_modules_flexos_loaded_first_are_gates_under_run(tmp_path: Path) -> None:
    """Each of these was the app's local module under ``flexos run``: flexos had imported it."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(PRE_IMPORTED))
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """\
            import importlib, os, sys
            local = [n for n in sys.argv[1:] if type(importlib.import_module(n)).__name__ != "ModuleProxy"]
            print("local:", local)
            import json, zlib
            print(json.dumps({"pid": os.getpid()}) != json.dumps({"pid": json.loads("0")}), zlib.crc32(b"x"))
            """
        )
    )
    done = subprocess.run(
        [str(FLEXOS), "run", "app.py", *PRE_IMPORTED], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["local: []", "True 2363233923"]


def test_boot_gates_a_module_the_app_imported_first() -> None:
    """``flexos.boot`` after ``import json``: the next import is the gate; stop() gives json back."""
    import json

    image = Image(
        {"app": CompartmentSpec("app", "fcalls", default=True), "box": CompartmentSpec("box", "process")},
        {"json": "box"},
    )
    with flexos.boot(image) as runtime:
        import json as gated

        assert type(gated).__name__ == "ModuleProxy"
        assert gated.loads("[1, 2]") == [1, 2]
        assert runtime.compartments["box"].pid is not None
    assert sys.modules["json"] is json


def test_boot_warns_of_a_name_bound_before_it(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["json"]))
    script = "import json, flexos\nwith flexos.boot('flexos.yaml'):\n    pass\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (
        "'json' in __main__ is the local module 'json', imported before flexos.boot(); flexos.yaml places it in "
        "compartment 'box': import it after boot to reach it there"
    ) in done.stderr


@pytest.mark.parametrize("driver", ["subinterp", "vm"])
def test_isolating_default_compartment_refused_by_run(tmp_path: Path, driver: str) -> None:
    """The user-facing side of item 4: ``flexos run`` refuses it with FILE:LINE and exit 2."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(["sqlite3"]).replace("{driver: fcalls}", f"{{driver: {driver}}}", 1))
    (tmp_path / "app.py").write_text("print('ran')\n")
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "flexos.yaml:3: compartment 'app' is the default one, which is the app's own process; "
        "give it driver 'fcalls' and isolate the other compartments\n"
    )


# -- item 2: placement is verified ------------------------------------------------------------------
def placement_problems(tmp_path: Path, *modules: str) -> list[str]:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(list(modules)))
    with pytest.raises(ConfigError) as info:
        parse(path, app_path(path))
    return info.value.problems


@pytest.mark.parametrize(
    ("written", "import_name", "distribution"),
    [("pillow", "PIL", "pillow"), ("PyYAML", "yaml", "PyYAML"), ("ruamel_yaml", "ruamel", "ruamel.yaml")],
)
def test_a_distribution_name_is_not_a_module(tmp_path: Path, written: str, import_name: str, distribution: str) -> None:
    (problem,) = placement_problems(tmp_path, written)
    assert problem.startswith(f"{tmp_path / 'flexos.yaml'}:8: library {written!r} is not a module found in ")
    assert problem.endswith(
        f"; did you mean {import_name!r} (the import name of the distribution {distribution!r})?"
        "; libraries: keys are import names"
    )


def test_a_module_that_does_not_exist(tmp_path: Path) -> None:
    first, second = placement_problems(tmp_path, "jsonn", "xml.etree.ElementTre")
    assert "library 'jsonn' is not a module found in the app's path" in first
    assert first.endswith("did you mean 'json'?; libraries: keys are import names")
    assert "library 'xml.etree.ElementTre' is not a module found in package 'xml.etree'" in second
    assert "did you mean 'xml.etree.ElementTree'?" in second


def test_a_module_beside_the_app_is_found(tmp_path: Path) -> None:
    (tmp_path / "myparsers.py").write_text("")
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(["myparsers", "sqlite3"]))
    assert parse(path, app_path(path))[0].libraries == {"myparsers": "box", "sqlite3": "box"}


@pytest.mark.parametrize("module", ["os", "sys", "builtins", "os.path", "importlib.util", "threading"])
def test_what_every_compartment_runs_on_cannot_be_placed(tmp_path: Path, module: str) -> None:
    (problem,) = placement_problems(tmp_path, module)
    top = module.partition(".")[0]
    assert problem == (
        f"{tmp_path / 'flexos.yaml'}:8: library {module!r} cannot be placed: every compartment's interpreter "
        f"(and flexos in it) runs on its own {top!r}; remove this entry"
    )


def test_main_cannot_be_placed(tmp_path: Path) -> None:
    (problem,) = placement_problems(tmp_path, "__main__")
    assert problem.endswith(
        "'__main__' cannot be placed: it is the app's own script, which runs in the default compartment; "
        "move the code to box into a module of its own and place that"
    )


def test_run_refuses_a_misplaced_name(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["pillow"]))
    (tmp_path / "app.py").write_text("print('ran')\n")
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert "did you mean 'PIL' (the import name of the distribution 'pillow')?" in done.stderr
