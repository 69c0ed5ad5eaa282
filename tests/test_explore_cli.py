"""``flexos explore`` end to end: real benchmark commands, the results cache, resuming, errors, and
the sqlite example (sqlite3 moving between the app's process and hardened compartment processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexos.config import parse
from flexos.explore.order import documented_order, members
from flexos.explore.search import DECISIVE
from flexos.explore.space import load_space

ROOT = Path(__file__).resolve().parent.parent
FLEXOS = Path(sys.executable).parent / "flexos"

# A real benchmark program: it loads the generated flexos.yaml with flexos itself, logs the call,
# fails once on request (an interruption), and scores a configuration by how much it isolates.
BENCH = """\
import os, sys
from pathlib import Path
from flexos.config import parse

here = Path(__file__).parent
image, _ = parse(os.environ["FLEXOS_CONFIG"])
with open(here / "calls.log", "a") as log:
    log.write(f"{image.source} {os.environ['FLEXOS_REPEAT']}\\n")
calls = len((here / "calls.log").read_text().splitlines())
if (here / "fail-at").exists() and calls == int((here / "fail-at").read_text()):
    (here / "fail-at").unlink()
    print("simulated crash", file=sys.stderr)
    sys.exit(3)
processes = sum(spec.driver == "process" for spec in image.compartments.values())
hardened = sum(bool(spec.hardening) for spec in image.compartments.values()) + len(image.library_hardening)
print("warming up")
print(1000 / (1 + processes + 0.5 * hardened))
"""

SPACE = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
explore:
  components: {json: {short: J, modules: [json, _json]}, csv: {short: C, modules: [csv, _csv]}}
  compartments: 2
  drivers: [fcalls, process]
  hardening: {library: {H: {audit: {deny: [subprocess]}}}}
  benchmark:
    command: python bench.py
    repeats: 2
"""


def make(tmp_path: Path, space: str = SPACE, bench: str = BENCH) -> Path:
    (tmp_path / "bench.py").write_text(bench)
    path = tmp_path / "space.yaml"
    path.write_text(space)
    return path


def explore(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLEXOS), "explore", *args], capture_output=True, text=True, timeout=timeout)


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_explore_runs_the_command_and_writes_results(tmp_path: Path) -> None:
    space_path = make(tmp_path)
    out = tmp_path / "out"
    done = explore(str(space_path), "--budget", "300", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    space, _ = load_space(space_path)
    configs = space.configurations()
    score = {}
    for record in results["results"]:
        image, _ = parse(out / "configs" / f"{record['name']}.yaml") if record["status"] == "measured" else (None, 0)
        if image is not None:
            processes = sum(s.driver == "process" for s in image.compartments.values())
            hardened = sum(bool(s.hardening) for s in image.compartments.values()) + len(image.library_hardening)
            score[record["name"]] = 1000 / (1 + processes + 0.5 * hardened)
            assert record["runs"] == [pytest.approx(score[record["name"]])] * 2
    # the command ran exactly twice (repeats) for each measured configuration, with the run number
    log = calls(tmp_path)
    assert len(log) == 2 * results["measured"] == 2 * len(score)
    assert sorted(line.split()[1] for line in log) == sorted(["0", "1"] * len(score))
    # the stars are the safest configurations scoring >= 300 (the score falls as isolation grows)
    order = documented_order(configs)
    index = {c.name: i for i, c in enumerate(configs)}
    for name in results["stars"]:
        assert score[name] >= 300
        for safer in members(order.above[index[name]]):
            record = results["results"][safer]
            assert not record["meets_budget"]
    assert results["measured"] + results["inferred"] == len(configs) == 13
    assert f"measured {results['measured']} of {len(configs)} configurations" in done.stdout
    assert "confidence 1.000" in done.stdout  # identical runs: no doubt about any side of the budget
    assert {p.name for p in out.iterdir()} == {
        "cache.jsonl",
        "configs",
        "results.csv",
        "results.json",
        "performance.svg",
        "poset.svg",
    }

    # Run again: everything comes from the cache, nothing runs.
    again = explore(str(space_path), "--budget", "300", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "benchmark runs: 0 now" in again.stdout
    assert len(calls(tmp_path)) == len(log)
    assert json.loads((out / "results.json").read_text())["stars"] == results["stars"]


def test_an_interrupted_exploration_resumes(tmp_path: Path) -> None:
    space_path = make(tmp_path)
    (tmp_path / "fail-at").write_text("3")
    out = tmp_path / "out"
    first = explore(str(space_path), "--budget", "300", "--out", str(out))
    assert first.returncode == 1
    assert "the command exited with status 3; its last output:\nsimulated crash" in first.stderr
    assert f"2 runs are cached in {out / 'cache.jsonl'}; run the same command again to resume." in first.stderr
    second = explore(str(space_path), "--budget", "300", "--out", str(out))
    assert second.returncode == 0, second.stderr
    results = json.loads((out / "results.json").read_text())
    # nothing ran twice: the two cached runs, the crashed one, then the rest
    assert len(calls(tmp_path)) == 2 * results["measured"] + 1
    assert f"benchmark runs: {2 * results['measured'] - 2} now" in second.stdout


@pytest.mark.parametrize(
    ("command", "timeout", "message"),
    [
        ("echo 12 apples", 60, "the last line of its stdout must be the metric (a finite number), got '12 apples'"),
        ("echo nan", 60, "got 'nan'"),
        ("sleep 5; echo 1", 0.5, "still running after 0.5 s; raise benchmark.timeout or shorten the run"),
        ("echo oops >&2; exit 4", 60, "the command exited with status 4; its last output:\noops"),
    ],
)
def test_a_failing_benchmark_is_reported(tmp_path: Path, command: str, timeout: float, message: str) -> None:
    space = SPACE.replace("command: python bench.py", f"command: '{command}'\n    timeout: {timeout}")
    done = explore(str(make(tmp_path, space)), "--budget", "1", "--out", str(tmp_path / "out"))
    assert done.returncode == 1
    assert f"space.yaml: benchmark for J1C1_f (run 1, config {tmp_path / 'out' / 'configs' / 'J1C1_f.yaml'})" in (
        done.stderr
    )
    assert message in done.stderr


# Fails (as a C extension refusing a subinterpreter would) when json and csv share a process.
FAILING_BENCH = BENCH.replace(
    'print("warming up")',
    """json_at, csv_at = image.libraries["json"], image.libraries["csv"]
if json_at == csv_at and image.compartments[json_at].driver == "process":
    print("traceback ...", file=sys.stderr)
    print("cannot run: json and csv share a process", file=sys.stderr)
    sys.exit(5)
print("warming up")""",
)


def test_recorded_failures_are_results_not_stops(tmp_path: Path) -> None:
    space = SPACE.replace("    repeats: 2\n", "    repeats: 2\n    failures: record\n")
    space_path = make(tmp_path, space, FAILING_BENCH)
    out = tmp_path / "out"
    done = explore(str(space_path), "--budget", "0", "--exhaustive", "--out", str(out))
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    failed = {r["name"]: r for r in results["results"] if r["status"] == "failed"}
    assert set(failed) == {"J1C1_p", "J1HC1_p", "J1C1H_p", "J1HC1H_p"}
    for record in failed.values():
        assert record["failure"] == "exit status 5: cannot run: json and csv share a process"
        assert not record["star"] and not record["meets_budget"] and record["runs"] == []
    assert results["failed"] == 4 and results["measured"] == 13 - 4 and results["inferred"] == 0
    assert not set(results["stars"]) & set(failed)
    assert "failed 4 (could not run; never stars):" in done.stdout
    assert "  4: J1C1_p J1C1H_p J1HC1_p J1HC1H_p: exit status 5: cannot run" in done.stdout
    # Exhaustive runs go in rounds: every configuration's run 0, then every run 1, the second round
    # starting halfway through the configurations; a failed configuration is not run again.
    log = [line.split() for line in calls(tmp_path)]
    assert [run for _, run in log] == ["0"] * 13 + ["1"] * 9
    order = [Path(config).stem for config, _ in log]
    names = [config.name for config in load_space(space_path)[0].configurations()]
    assert order[:13] == names
    assert order[13:] == [n for n in names[6:] + names[:6] if n not in failed]
    # The failures are cached with their reason: nothing runs again, the answer is the same.
    again = explore(str(space_path), "--budget", "0", "--exhaustive", "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "benchmark runs: 0 now" in again.stdout and len(calls(tmp_path)) == 22
    assert json.loads((out / "results.json").read_text())["results"] == results["results"]
    # Without failures: record, the first failure stops the exploration, as before (a cached one runs again).
    stopped = explore(str(make(tmp_path, SPACE, FAILING_BENCH)), "--budget", "0", "--exhaustive", "--out", str(out))
    assert stopped.returncode == 1
    assert "the command exited with status 5; its last output:\ntraceback ...\ncannot run" in stopped.stderr


def test_list_check_and_usage(tmp_path: Path) -> None:
    space_path = make(tmp_path)
    listed = explore(str(space_path), "--list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[0] == f"13 configurations in {space_path}:"
    assert "  J1HC2H_pp  c1 process: json[H] | c2 process: csv[H]" in listed.stdout
    assert calls(tmp_path) == []
    no_budget = explore(str(space_path))
    assert no_budget.returncode == 2 and "give --budget (or --list to see the configurations)" in no_budget.stderr
    space_path.write_text(SPACE.replace("compartments: 2", "compartments: two"))
    bad = explore(str(space_path), "--budget", "1")
    assert bad.returncode == 2
    assert f"{space_path}:7: explore.compartments: Input should be a valid integer" in bad.stderr


def test_unavailable_drivers_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver this machine cannot run is refused with the driver's own reason, before anything runs."""
    from click.testing import CliRunner

    import flexos.drivers
    from flexos.cli import main

    real, reason = flexos.drivers.unavailable, "QEMU is not installed (scripts/setup installs it)"
    monkeypatch.setattr(
        flexos.drivers, "unavailable", lambda driver, *a, **k: reason if driver == "vm" else real(driver, *a, **k)
    )
    space_path = make(tmp_path, SPACE.replace("drivers: [fcalls, process]", "drivers: [process, vm]"))
    done = CliRunner().invoke(main, ["explore", str(space_path), "--budget", "1"])
    assert done.exit_code == 2
    assert done.stderr.startswith(f"{space_path}:8: driver 'vm': {reason}")
    assert calls(tmp_path) == []


EXAMPLE = ROOT / "examples" / "explore_sqlite" / "space.yaml"


def test_sqlite_example_end_to_end(tmp_path: Path) -> None:
    """The real workload: inserts.py under `flexos run`, sqlite3 in the app's process or a process."""
    # A budget every configuration meets: the safest one is the answer, found by measuring two,
    # unless the runs of one scatter so much that it is not decisive (a loaded machine): then the
    # search measures the star's neighbours to settle it, and the answer is the same.
    done = explore(str(EXAMPLE), "--budget", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stars"] == ["Q1Audit_pEnvSeccomp"]
    measured = {r["name"]: r for r in results["results"] if r["status"] == "measured"}
    assert {"Q1_f", "Q1Audit_pEnvSeccomp"} <= set(measured)
    assert results["measured"] + results["inferred"] == 9
    if all(r["certainty"] >= DECISIVE for r in measured.values()):
        assert set(measured) == {"Q1_f", "Q1Audit_pEnvSeccomp"}, json.dumps(results)
    else:
        assert len(measured) > 2
    for record in measured.values():
        assert len(record["runs"]) == 3 and all(v > 0 for v in record["runs"])
        image, _ = parse(record["config"])
        assert image.libraries["sqlite3"] == image.libraries["_sqlite3"] == "c1"
    assert "* Q1Audit_pEnvSeccomp " in done.stdout

    # A budget nothing meets, from the cache: the least safe misses it, so every other does.
    done = explore(str(EXAMPLE), "--budget", "1e12", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "no configuration meets it" in done.stdout and "benchmark runs: 0 now" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stars"] == [] and results["measured"] == 1

    # A budget between the two measured: the answer must agree with what was measured.
    values = [r["value"] for r in measured.values()]
    low, high = min(values), max(values)
    done = explore(str(EXAMPLE), "--budget", str((low * high) ** 0.5), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    space, _ = load_space(EXAMPLE)
    configs = space.configurations()
    order = documented_order(configs)
    records = results["results"]
    assert results["stars"]
    for star in results["stars"]:
        index = next(i for i, c in enumerate(configs) if c.name == star)
        assert records[index]["status"] == "measured" and records[index]["value"] >= results["budget"]
        assert not any(records[j]["meets_budget"] for j in members(order.above[index]))
    for index, record in enumerate(records):
        if record["status"] == "measured" and record["meets_budget"]:
            assert record["star"] or any(records[j]["star"] for j in members(order.above[index]))


def test_sqlite_example_lists_nine_configurations() -> None:
    done = explore(str(EXAMPLE), "--list")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"9 configurations in {EXAMPLE}:"
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == [
        "Q1_f",
        "Q1_p",
        "Q1Audit_p",
        "Q1_pEnv",
        "Q1Audit_pEnv",
        "Q1_pSeccomp",
        "Q1Audit_pSeccomp",
        "Q1_pEnvSeccomp",
        "Q1Audit_pEnvSeccomp",
    ]


def test_the_engine_flag_and_key(tmp_path: Path) -> None:
    """``--engine`` and the space's ``engine:`` key: the flag overrides the key, a wrong name names
    the choices (the ray engine itself runs in tests/test_explore_ray.py, in a namespace of its own)."""
    from click.testing import CliRunner

    from flexos.cli import main

    unknown = CliRunner().invoke(main, ["explore", str(make(tmp_path)), "--budget", "300", "--engine", "dask"])
    assert unknown.exit_code == 2 and "unknown engine 'dask' (known: local, ray)" in unknown.stderr
    mistyped = make(tmp_path, SPACE.replace("  benchmark:", "  engine: rayy\n  benchmark:"))
    refused = CliRunner().invoke(main, ["explore", str(mistyped), "--budget", "300"])
    assert refused.exit_code == 2
    assert f"{mistyped}:10: explore.engine: Input should be 'local' or 'ray'; did you mean 'ray'?" in refused.stderr
    assert calls(tmp_path) == []
    keys = "  engine: ray\n  address: 127.0.0.1:9\n  benchmark:"
    quick = "command: echo $FLEXOS_REPEAT >> calls.log; echo 500"  # every configuration meets the budget
    on_cluster = make(tmp_path, SPACE.replace("  benchmark:", keys).replace("command: python bench.py", quick))
    space, _ = load_space(on_cluster)
    assert (space.engine, space.address) == ("ray", "127.0.0.1:9")
    out = tmp_path / "out"
    local = explore(str(on_cluster), "--budget", "300", "--engine", "local", "--out", str(out))  # no Ray starts
    assert local.returncode == 0, local.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["hosts"]) == ["local"] and len(calls(tmp_path)) == 2 * results["measured"]
    assert "batches" not in local.stdout  # one host: no batches line


def test_the_report_shows_unlike_hosts(tmp_path: Path) -> None:
    """Results from unlike hosts are visible: each kind of host (CPU, kernel, Python, flexos,
    drivers, features) with how many hosts are of it, and the lost runs."""
    from flexos.explore import report
    from flexos.explore.engines import this_host
    from flexos.explore.order import safety_facts
    from flexos.explore.search import Goal, search

    space, _ = load_space(make(tmp_path))
    configs = space.configurations()
    order = documented_order(configs)
    facts = [safety_facts(c) for c in configs]
    goal = Goal(1, statistic="median")
    answer = search(order, goal, facts, lambda i: [2.0, 2.0], batch=2)
    here = this_host().record()
    other = {**here, "hostname": "b", "kernel": "6.1.0-other", "features": {**here["features"], "landlock": False}}
    hosts = {"n1": here, "n2": {**here, "hostname": "a2"}, "n3": other}
    execution = report.Execution(hosts, [("J1_f", "node died")], (len(answer.measured), True))
    text = report.table(space, configs, order, goal, answer, execution)
    kind = f"{here['cpu']}, kernel {here['kernel']}, Python {here['python']}"
    assert f"on 3 hosts: 2 x {kind}" in text
    assert f"; 1 x {here['cpu']}, kernel 6.1.0-other, Python {here['python']}" in text
    assert "lost 1 runs with their host, run again elsewhere: J1_f" in text
    summary = report.summary(space, configs, order, goal, answer, execution)
    assert summary["hosts"]["n3"]["hostname"] == "b" and summary["hosts"]["n3"]["kernel"] == "6.1.0-other"
    assert {"hostname", "cpu", "kernel", "features", "drivers"} <= set(summary["hosts"]["n1"])


def test_the_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal stderr shows a bar of configurations settled, even on a pty that reports no
    size (as under script or a CI runner); on a pipe it stays hidden (the other tests)."""
    import os
    import pty
    import threading

    quick = "command: echo $FLEXOS_REPEAT >> calls.log; echo 500"
    space_path = make(tmp_path, SPACE.replace("command: python bench.py", quick))
    primary, secondary = pty.openpty()
    command = [str(FLEXOS), "explore", str(space_path), "--budget", "300", "--out", str(tmp_path / "out")]
    done = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=secondary, stdin=subprocess.DEVNULL)
    os.close(secondary)
    shown: list[bytes] = []

    def drain() -> None:
        try:
            while chunk := os.read(primary, 4096):
                shown.append(chunk)
        except OSError:  # the process closed its end
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    assert done.wait(timeout=300) == 0
    reader.join(timeout=30)
    os.close(primary)
    terminal = b"".join(shown).decode()
    assert "explore: 100%" in terminal and "| 13/13 [" in terminal and "config/s" in terminal, terminal


def test_ray_is_an_extra_never_a_dependency(tmp_path: Path) -> None:
    """Without ray installed the local engine explores (and never imports it), and --engine ray
    says which extra to install."""
    quick = "command: echo 500"
    space_path = make(tmp_path, SPACE.replace("command: python bench.py", quick))
    program = f"""
import sys
sys.modules["ray"] = None  # as if ray were not installed: importing it raises ModuleNotFoundError
from click.testing import CliRunner
from flexos.cli import main
local = CliRunner().invoke(main, ["explore", {str(space_path)!r}, "--budget", "300", "--out", {str(tmp_path / "a")!r}])
assert local.exit_code == 0, local.output
assert not [name for name in sys.modules if name.startswith("ray.")]
ray = CliRunner().invoke(main, ["explore", {str(space_path)!r}, "--budget", "300", "--engine", "ray"])
print(ray.exit_code, ray.stderr)
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 flexos explore: the ray engine needs ray, which this install lacks: ")
    assert "pip install 'flexos[cluster]'" in done.stdout
