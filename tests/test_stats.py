"""Gate statistics (``flexos run --stats``, ``--stats-json FILE``, ``Runtime.stats()``) from real runs.

Parametrized over fcalls-strict, subinterp and process; vm is left out: its app side is the
process driver's code path (a link over a transport to another interpreter), booting a guest
would only make these tests slower. Counts are asserted exactly; times never are.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from driver_variants import needs

import flexos
from flexos.errors import CompartmentCrashed
from flexos.gates.stats import flexos_own
from flexos.runtime import stats as run_stats
from flexos.runtime.stats import CompartmentStats

FLEXOS = Path(sys.executable).parent / "flexos"

STATS_DRIVERS = ["fcalls-strict", pytest.param("subinterp", marks=needs("subinterp")), "process"]


@pytest.fixture(params=STATS_DRIVERS)
def counting(request: pytest.FixtureRequest, boot: Callable[..., flexos.Runtime]) -> flexos.Runtime:
    """A runtime that counts, with the fixture library ``complib`` in compartment ``box``."""
    return boot(request.param, stats=True)


def box(runtime: flexos.Runtime) -> CompartmentStats:
    (row,) = [row for row in runtime.stats().compartments if row.name == "box"]
    return row


def calls_to(row: CompartmentStats, target: str) -> int:
    return sum(t.calls for t in row.targets if t.target == target)


def doubled(value: int) -> int:
    """A function of the app's, for the compartment to call back."""
    return value * 2


def test_n_calls_are_n_counted(counting):
    complib = importlib.import_module("complib")
    add = complib.add
    add(0, 0)
    before = box(counting)
    for i in range(37):
        assert add(i, 1) == i + 1
    after = box(counting)
    assert after.calls - before.calls == 37
    assert calls_to(after, "complib.add") - calls_to(before, "complib.add") == 37


def test_the_hottest_target_is_the_one_called_most(counting):
    complib = importlib.import_module("complib")
    add, echo = complib.add, complib.echo
    for i in range(25):
        add(i, i)
    for i in range(7):
        echo(i)
    row = box(counting)
    app_targets = [t for t in row.targets if not t.flexos]
    assert [(t.target, t.calls) for t in app_targets[:2]] == [("complib.add", 25), ("complib.echo", 7)]
    hottest = run_stats.table(counting.stats()).split("hottest calls into box")[1].splitlines()[1]
    assert hottest.split()[0] == "25" and hottest.endswith("  complib.add")


def test_bytes_are_counted_each_way(counting):
    complib = importlib.import_module("complib")
    payload = "x" * 5000
    assert complib.echo(payload) == payload
    row = box(counting)
    (echo,) = [t for t in row.targets if t.target == "complib.echo"]
    assert echo.sent_bytes > 5000 and echo.received_bytes > 5000
    assert row.sent_bytes >= echo.sent_bytes and row.received_bytes >= echo.received_bytes


def test_a_callback_into_the_app_is_counted(counting):
    complib = importlib.import_module("complib")
    complib.call(doubled, 0)  # the first also has the compartment describe what a function is (flexos's own)
    before = box(counting)
    assert [complib.call(doubled, i) for i in range(4)] == [0, 2, 4, 6]
    after = box(counting)
    label = f"{doubled.__module__}.{doubled.__qualname__}"
    counted = {t.target: t for t in after.callback_targets}
    assert counted[label].calls == 5 and not counted[label].flexos
    assert counted[label].sent_bytes > 0 and counted[label].received_bytes > 0
    assert after.callbacks - before.callbacks == 4
    assert "hottest callbacks from box" in run_stats.table(counting.stats())


def test_flexos_own_crossings_are_in_the_totals_not_the_hottest(counting):
    complib = importlib.import_module("complib")
    complib.add(1, 2)
    run = counting.stats()
    (row,) = [row for row in run.compartments if row.name == "box"]
    own = [t for t in row.targets + row.callback_targets if t.flexos]
    assert {"import flexos.runtime.state", "flexos.runtime.state.install"} <= {t.target for t in own}
    assert row.calls == sum(t.calls for t in row.targets)  # flexos's own included
    assert all(flexos_own(t.target) == t.flexos for t in row.targets + row.callback_targets)
    shown = run_stats.table(run)
    hottest = [line for line in shown.splitlines() if line.startswith("    ")]
    assert hottest and not any("flexos.runtime.state" in line or "  describe " in line for line in hottest)
    assert "flexos's own crossings with box" in shown


def test_a_restart_after_a_crash_is_counted(boot):
    runtime = boot("process", restart="on-failure", stats=True)
    process = importlib.import_module("complib.process")
    first = process.getpid()
    with pytest.raises(CompartmentCrashed):
        process.crash()
    assert process.getpid() != first
    row = box(runtime)
    assert (row.starts, row.restarts) == (2, 1)
    assert calls_to(row, "complib.process.crash") == 1 and calls_to(row, "complib.process.getpid") == 2


def test_the_json_schema_is_stable(counting):
    importlib.import_module("complib").add(1, 2)
    shape = json.loads(run_stats.to_json(counting.stats()))
    assert shape["schema"] == 1 == run_stats.SCHEMA
    assert list(shape) == ["schema", "wall_seconds", "seconds", "share", "start_seconds", "compartments"]
    (row,) = [row for row in shape["compartments"] if row["name"] == "box"]
    assert list(row) == [
        "name",
        "driver",
        "starts",
        "restarts",
        "start_seconds",
        "calls",
        "seconds",
        "share",
        "callbacks",
        "callback_seconds",
        "sent_bytes",
        "received_bytes",
        "proxies",
        "lent",
        "targets",
        "callback_targets",
    ]
    assert all(
        list(target) == ["target", "calls", "seconds", "sent_bytes", "received_bytes", "flexos"]
        for target in row["targets"] + row["callback_targets"]
    )


def test_a_runtime_booted_without_stats_does_not_count(boot):
    runtime = boot("process")
    importlib.import_module("complib").add(1, 2)
    link = runtime.compartments["box"].current_link
    assert link is not None and "call" not in vars(link)  # the link's own method: no counting wrapper
    with pytest.raises(RuntimeError, match="does not count"):
        runtime.stats()


# -- flexos run ---------------------------------------------------------------------------------------
PROJECT_YAML = """\
compartments:
  - name: app
    mechanism:
      driver: fcalls
    default: true
  - name: lib
    mechanism:
      driver: process
    restart: on-failure
libraries:
  sqlite3:
    compartment: lib
  crasher:
    compartment: lib
"""

CRASHER = """\
import os


def crash():
    os.kill(os.getpid(), 9)
"""

APP = """\
import sys

import crasher
import sqlite3

from flexos import CompartmentCrashed

connection = sqlite3.connect(":memory:")
connection.execute("create table t (x)")
for i in range(50):
    connection.execute("insert into t values (?)", (i,))
print("sum", connection.execute("select sum(x) from t").fetchone()[0])
if "--crash" in sys.argv:
    try:
        crasher.crash()
    except CompartmentCrashed:
        print("crashed")
    import sqlite3 as again  # the restarted compartment
    print("after", again.connect(":memory:").execute("select 1").fetchone()[0])
    sys.stderr.write("last words, no newline")
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "flexos.yaml").write_text(PROJECT_YAML)
    (tmp_path / "crasher.py").write_text(CRASHER)
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def flexos_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([str(FLEXOS), "run", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_flexos_run_stats_json_end_to_end(project):
    (project / "out").mkdir()
    done = flexos_run(project, "--stats-json", "out/stats.json", "app.py")
    assert done.stdout == "sum 1225\n"
    assert done.stderr == ""  # the JSON only: no table
    written = json.loads((project / "out" / "stats.json").read_text())
    assert written["schema"] == 1
    (lib,) = written["compartments"]
    assert (lib["name"], lib["driver"], lib["starts"], lib["restarts"]) == ("lib", "process", 1, 0)
    targets = {target["target"]: target for target in lib["targets"]}
    assert targets["Connection.execute"]["calls"] == 52  # create, 50 inserts, select
    assert not targets["Connection.execute"]["flexos"] and targets["import flexos.runtime.state"]["flexos"]
    assert lib["sent_bytes"] > 0 and lib["received_bytes"] > 0


def test_flexos_run_stats_writes_to_stderr_only(project):
    plain = flexos_run(project, "app.py")
    counted = flexos_run(project, "--stats", "app.py")
    assert counted.stdout == plain.stdout == "sum 1225\n"
    assert plain.stderr == ""  # without --stats: no statistics at all
    assert counted.stderr.startswith("\nflexos stats: ")
    assert "hottest calls into lib" in counted.stderr and "Connection.execute" in counted.stderr


def test_after_a_crash_the_table_starts_on_its_own_line_and_counts_the_restart(project):
    done = flexos_run(project, "--stats", "--stats-json", "stats.json", "app.py", "--crash")
    assert done.stdout == "sum 1225\ncrashed\nafter 1\n"
    before, table = done.stderr.split("\nflexos stats: ", 1)
    assert before.endswith("last words, no newline")  # the app's, on a line the table does not share
    assert "flexos stats" not in before
    row = next(line for line in table.splitlines() if line.split()[:2] == ["lib", "process"])
    assert row.split()[2:4] == ["2", "1"]  # starts, restarts
    (lib,) = json.loads((project / "stats.json").read_text())["compartments"]
    assert (lib["starts"], lib["restarts"]) == (2, 1)
