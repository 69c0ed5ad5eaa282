"""``pytest --flexos`` and ``--flexos-diff`` (flexos/pytest_plugin.py) on a small app's own suite.

The app (tests/fixtures/plugin_app) places ``pluglib`` in a process compartment; its tests know
nothing of flexos. Each run is a pytest of its own, as a user would start it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from driver_variants import needs

from flexos import CompartmentSpec, Image
from flexos.pytest_plugin import Outcome, OutcomeWriter, in_sample, on_mechanism, read_outcomes

APP = Path(__file__).parent / "fixtures" / "plugin_app"


@pytest.fixture
def app(tmp_path: Path) -> Path:
    copy = tmp_path / "app"
    shutil.copytree(APP, copy)
    return copy


def pytest_in(app: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args], cwd=app, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("mechanism", ["process", pytest.param("subinterp", marks=needs("subinterp"))])
def test_the_suite_runs_with_the_library_behind_a_gate_in_a_compartment_without_pytest(app, mechanism):
    outcomes = app / "outcomes.jsonl"
    run = pytest_in(app, "--flexos", "flexos.yaml", "--flexos-driver", mechanism, "--flexos-outcomes", str(outcomes))
    assert run.returncode == 1, run.stdout  # the list identity test fails: a list crosses by value
    assert {nodeid: o.outcome for nodeid, o in read_outcomes(outcomes).items()} == {
        "check_app.py::test_add": "passed",
        "check_app.py::test_a_list_comes_back_as_itself": "failed",
        "check_app.py::test_the_library_is_behind_a_gate": "passed",
        "check_app.py::test_the_compartment_loads_neither_pytest_nor_the_config_stack": "passed",
    }


def test_without_the_option_the_plugin_boots_nothing(app):
    run = pytest_in(app, "-k", "gate or add")
    assert "1 failed, 1 passed" in run.stdout, run.stdout  # pluglib is the real module


def test_a_module_imported_before_the_boot_is_refused_with_the_reason(app):
    run = pytest_in(app, "-p", "pluglib", "--flexos", "flexos.yaml")
    assert run.returncode != 0
    assert "pluglib already imported before flexos booted" in run.stderr, run.stderr


@pytest.mark.slow  # four pytests, one per mechanism (~30 s on a loaded machine)
def test_diff_reports_each_test_whose_outcome_differs_with_its_first_line(app):
    run = pytest_in(app, "--flexos", "flexos.yaml", "--flexos-diff", "-k", "add or list")
    assert run.returncode == 1, run.stdout
    lines = run.stdout.splitlines()
    assert lines[0].startswith("plain          2 passed ("), run.stdout  # the reference, first
    for mechanism in ("fcalls-strict", "process"):
        at = lines.index(f"{mechanism}: check_app.py::test_a_list_comes_back_as_itself: passed -> failed")
        assert lines[at + 1].strip().endswith("check_app.py:14: AssertionError: assert [1, 2] is [1, 2]")
    assert not any("test_add" in line for line in lines)
    assert lines[-1].startswith("flexos-diff: ")


def test_diff_needs_the_image(app):
    run = pytest_in(app, "--flexos-diff")
    assert run.returncode != 0
    assert "--flexos-diff needs --flexos FLEXOS_YAML" in run.stderr


def test_the_sample_is_the_same_one_in_n_every_time() -> None:
    ids = [f"tests/test_x.py::test_{i}" for i in range(4000)]
    chosen = [nodeid for nodeid in ids if in_sample(nodeid, 10)]
    assert 300 < len(chosen) < 500
    assert chosen == [nodeid for nodeid in ids if in_sample(nodeid, 10)]
    assert all(in_sample(nodeid, 1) for nodeid in ids)


def test_outcomes_written_before_a_kill_are_read_and_a_cut_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "o.jsonl"
    writer = OutcomeWriter(path)
    writer._write("a", Outcome("passed"))
    writer.close()
    with path.open("a") as file:
        file.write('["b", "fail')
    assert {k: v.outcome for k, v in read_outcomes(path).items()} == {"a": "passed"}


def test_on_mechanism_moves_every_compartment_but_the_default_keeping_hardening_where_it_holds() -> None:
    hardened = {"network": "none"}
    image = Image(
        {
            "app": CompartmentSpec("app", "fcalls", default=True),
            "lib": CompartmentSpec("lib", "process", {"spin_us": 5}, hardening=hardened),
        },
        {"pluglib": "lib"},
    )
    on_subinterp = on_mechanism(image, "subinterp")
    assert on_subinterp.compartments["app"] == image.compartments["app"]
    assert (on_subinterp.compartments["lib"].driver, on_subinterp.compartments["lib"].options) == ("subinterp", {})
    assert on_subinterp.compartments["lib"].hardening == {}  # a subinterpreter cannot enforce it
    assert on_mechanism(image, "process").compartments["lib"].hardening == hardened
    assert on_mechanism(image, "fcalls-strict").compartments["lib"].options == {"strict": True}
    with pytest.raises(ValueError, match="does not boot"):
        on_mechanism(image, "plain")


def test_on_mechanism_keeps_buffer_views_only_where_the_driver_lends_sealed_buffers() -> None:
    image = Image(
        {"app": CompartmentSpec("app", "fcalls", default=True), "lib": CompartmentSpec("lib", "process")},
        {"pluglib": "lib", "other": "lib"},
        library_sharing={"pluglib": {"buffers": "view"}},
    )
    assert on_mechanism(image, "process").buffer_sharing("lib") == "view"
    assert on_mechanism(image, "subinterp").library_sharing == {}
    copies = Image(image.compartments, image.libraries, library_sharing={"pluglib": {"buffers": "copy"}})
    assert on_mechanism(copies, "subinterp").library_sharing == {"pluglib": {"buffers": "copy"}}
