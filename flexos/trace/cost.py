"""What a proposal will cost here: this machine's gate costs, measured once and cached, times the
crossings the runs made.

A calibration (``python -m flexos.trace.cost DRIVER...``, in a child process of its own) boots a
compartment of each driver the proposal may use with a one-function module in it, and measures
a small call's round trip and the time per byte of a list of 2000 small lists crossing both ways
(what apps pass: per byte, many small values cost several times what one large bytes object
does), then what such a compartment, hardened as a proposal hardens it, adds to ``flexos run`` of
a script that calls it once. Once, it also measures Python's own start, ``flexos run``'s (reading
flexos.yaml, booting the runtime), and what ``sys.monitoring`` costs per event besides the
recorder's callbacks (which time themselves), so that a traced run's CPU time can be told from
the app's; and, between the rest, how much longer a CPU-bound loop takes by the wall clock than
in CPU time (the *stretch*: on a shared machine the round trips measured include other
processes' turns, and so will the app's own work). The answers are cached in
``$XDG_CACHE_HOME/flexos/trace/calibration.json`` (default ``~/.cache``), keyed by this machine,
Python and flexos; ``flexos trace --recalibrate`` measures again.

The prediction, per compartment: its crossings (calls between a unit placed in it and a unit
outside it, both ways) x the round trip of its mechanism, plus their bytes x the time per byte,
over the CPU time the runs spent between the first and the last of those calls (less the
recorder's own share) times the stretch. A short command also pays, once per run, ``flexos
run``'s start and each compartment's: the *whole-run* figure adds them to the runs' wall time
(less the recorder's) and Python's start.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexos.trace.propose import DEFAULT, Proposal

_ECHO = "def echo(value):\n    return value\n"
CALIBRATION_VERSION = 6


def cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexos" / "trace" / "calibration.json"


def _machine() -> dict[str, Any]:
    return {
        "version": CALIBRATION_VERSION,
        "node": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "flexos": _flexos_version(),
    }


def _flexos_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flexos")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class GateCost:
    start_s: float  # what one compartment adds to ``flexos run``'s start, hardened as a proposal hardens it
    call_s: float  # a small call's round trip
    byte_s: float  # per byte carried (either way), for many small values in builtin containers


@dataclass(frozen=True)
class Calibration:
    gates: dict[str, GateCost]
    python_start_s: float
    flexos_run_s: float  # what ``flexos run`` adds to a run before the app starts (config, runtime)
    monitoring_event_s: float  # what sys.monitoring costs per event besides the recorder's callback
    # How much longer CPU-bound work takes by the wall clock than in CPU time while calibrating (1:
    # a CPU to itself): the gates' round trips are wall time, the traced work is CPU time.
    stretch: float = 1.0


def calibration(drivers: list[str], again: bool = False) -> Calibration:
    """This machine's costs for ``drivers``: from the cache, measuring what it lacks."""
    path = cache_file()
    cached: dict[str, Any] = {}
    if path.exists() and not again:
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = {}
    if cached.get("machine") != _machine():
        cached = {"machine": _machine(), "gates": {}}
    missing = [d for d in drivers if d not in cached["gates"]]
    if missing or "python_start_s" not in cached:
        measured = _measure(missing, base="python_start_s" not in cached)
        cached["gates"].update(measured.pop("gates"))
        cached["stretch"] = [*cached.get("stretch", []), *measured.pop("stretch")]
        cached.update(measured)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(cached, indent=1))
        partial.replace(path)  # whole: another flexos trace may be reading it now
    return Calibration(
        {name: GateCost(**cost) for name, cost in cached["gates"].items()},
        cached["python_start_s"],
        cached["flexos_run_s"],
        cached["monitoring_event_s"],
        statistics.median(cached.get("stretch") or [1.0]),
    )


def _measure(drivers: list[str], base: bool) -> dict[str, Any]:
    arguments = [*drivers, *(["--base"] if base else [])]
    done = subprocess.run(
        [sys.executable, "-m", "flexos.trace.cost", *arguments], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"flexos trace: calibrating {', '.join(arguments)} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[-1])


# -- the calibration child -------------------------------------------------------------------------
def _per_call(
    function: Any, argument: Any, calls: int, rounds: int = 5, clock: Callable[[], float] = time.perf_counter
) -> float:
    """The median over ``rounds`` of the mean time of ``calls`` calls, by ``clock``."""
    times = []
    for _ in range(rounds):
        started = clock()
        for _ in range(calls):
            function(argument)
        times.append((clock() - started) / calls)
    return statistics.median(times)


# What a proposal gives a compartment of a driver that can be hardened: start costs include it.
_PROPOSED_HARDENING = (
    "    hardening: {env: clean, network: none, filesystem: {read: [], write: []}, seccomp: compute-only,"
    " audit: {deny: [subprocess, ctypes, socket]}}\n"
)


def _gate(driver: str, workdir: Path) -> dict[str, float]:
    from flexos.drivers import driver_class
    from flexos.image import CompartmentSpec, Image
    from flexos.runtime import boot
    from flexos.trace.recorder import wire_size

    module = f"flexos_trace_echo_{driver.replace('-', '_')}"
    (workdir / f"{module}.py").write_text(_ECHO)
    image = Image(
        compartments={
            DEFAULT: CompartmentSpec(DEFAULT, "fcalls", default=True),
            "calibrated": CompartmentSpec("calibrated", driver),
        },
        libraries={module: "calibrated"},
        source="<flexos trace calibration>",
    )
    payload = _payload()
    with boot(image):
        echo = importlib.import_module(module).echo
        echo(0)
        _per_call(echo, 0, 200, rounds=1)
        small = _per_call(echo, 0, 400)
        _per_call(echo, payload, 3, rounds=1)
        big = _per_call(echo, payload, 10)
    # A compartment's start, as a short command pays it: ``flexos run`` of a script that calls it
    # once, against ``flexos run`` of an empty script with no compartment (_starts).
    hardening = _PROPOSED_HARDENING if driver_class(driver).hardenable else ""
    (workdir / f"{module}.yaml").write_text(
        f"compartments:\n  - name: {DEFAULT}\n    mechanism: {{driver: fcalls}}\n    default: true\n"
        f"  - name: calibrated\n    mechanism: {{driver: {driver}}}\n    reaches: []\n{hardening}"
        f"libraries:\n  {module}: {{compartment: calibrated}}\n"
    )
    (workdir / f"{module}_app.py").write_text(f"import {module}\n{module}.echo(0)\n")
    run = [sys.executable, "-c", "from flexos.cli import main; main()", "run", "-c", f"{module}.yaml"]
    return {
        "start_s": _wall([*run, f"{module}_app.py"], workdir) - _wall(_EMPTY_RUN, workdir),
        "call_s": small,
        "byte_s": max(0.0, (big - small) / (2 * wire_size(payload))),
    }


_EMPTY_RUN = [sys.executable, "-c", "from flexos.cli import main; main()", "run", "-c", "empty.yaml", "empty.py"]


def _stretch(seconds: float = 0.1) -> float:
    """Wall time over this thread's CPU time for a CPU-bound loop of about ``seconds``."""
    wall, cpu = time.perf_counter(), time.thread_time()
    while time.thread_time() - cpu < seconds:
        sum(range(1000))
    return (time.perf_counter() - wall) / (time.thread_time() - cpu)


def _payload() -> list[list[bytes]]:
    """What apps pass: many small values in builtin containers (a flat bytes costs less per byte)."""
    return [[b"SET", b"key:%06d" % i, b"value"] for i in range(2000)]


def _wall(command: list[str], cwd: Path, times: int = 3) -> float:
    measured = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, timeout=120)
        measured.append(time.perf_counter() - started)
    return statistics.median(measured)


def _empty(workdir: Path) -> None:
    (workdir / "empty.py").write_text("")
    (workdir / "empty.yaml").write_text(
        f"compartments:\n  - name: {DEFAULT}\n    mechanism: {{driver: fcalls}}\n    default: true\n"
    )


def _starts(workdir: Path) -> dict[str, float]:
    python = _wall([sys.executable, "empty.py"], workdir)
    flexos_run = _wall(_EMPTY_RUN, workdir)
    return {"python_start_s": python, "flexos_run_s": max(0.0, flexos_run - python)}


_LOOP = """
def inner(value):
    return value


def loop(n):
    for i in range(n):
        inner(i)
"""


def _dispatch_cost(workdir: Path) -> float:
    """What a PY_START event costs sys.monitoring besides the callback's body (an empty one here),
    in this thread's CPU time: the recorder's share is of the traced run's CPU time, and a wall
    clock on a loaded machine would count the other processes' turns too."""
    (workdir / "flexos_trace_loop.py").write_text(_LOOP)
    loop = importlib.import_module("flexos_trace_loop").loop  # written just now
    n = 100_000
    plain = _per_call(loop, n, 3, clock=time.thread_time)
    monitoring = sys.monitoring
    tool = next(t for t in (monitoring.PROFILER_ID, 3, 4) if monitoring.get_tool(t) is None)
    monitoring.use_tool_id(tool, "flexos trace calibration")
    monitoring.register_callback(tool, monitoring.events.PY_START, lambda code, offset: None)
    monitoring.set_events(tool, monitoring.events.PY_START)
    try:
        traced = _per_call(loop, n, 3, clock=time.thread_time)
    finally:
        monitoring.set_events(tool, 0)
        monitoring.free_tool_id(tool)
    return max(0.0, (traced - plain) / n)


def _calibrate(argv: list[str]) -> dict[str, Any]:
    base = "--base" in argv
    drivers = [a for a in argv if a != "--base"]
    with tempfile.TemporaryDirectory(prefix="flexos-trace-calibration-") as tmp:
        workdir = Path(tmp)
        sys.path.insert(0, tmp)  # compartments get the app's sys.path
        _empty(workdir)
        stretch = [_stretch()]
        result: dict[str, Any] = {"gates": {}}
        for driver in drivers:
            result["gates"][driver] = _gate(driver, workdir)
            stretch.append(_stretch())
        if base:
            result.update(_starts(workdir))
            result["monitoring_event_s"] = _dispatch_cost(workdir)
            stretch.append(_stretch())
        result["stretch"] = stretch
    return result


# -- the prediction --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompartmentCost:
    name: str
    mechanism: str
    crossings: int
    bytes: int
    added_s: float
    starts: int  # runs in which it starts
    slowdown: float  # of the work, this compartment alone
    alternatives: dict[str, float]  # another calibrated driver it can use -> its slowdown with that one


@dataclass(frozen=True)
class Prediction:
    compartments: list[CompartmentCost]
    work_s: float  # the runs' CPU time between the first and the last crossing, less the recorder's
    slowdown: float  # of that work, every compartment together
    whole_run: float  # of the runs from start to end, flexos's and the compartments' starts included
    overhead_share: float  # the recorder's estimated share of the traced runs' CPU time


def _recorder_share(run: dict[str, Any], monitoring_event_s: float) -> float:
    """The recorder's share of a traced run's CPU time: its callbacks' measured time, and the
    monitoring machinery's per event."""
    recorder = run["recorder"]
    spent = recorder["seconds"] + recorder["events"] * monitoring_event_s
    return min(0.95, spent / run["cpu_seconds"]) if run["cpu_seconds"] > 0 else 0.0


def predict(proposal: Proposal, costs: Calibration) -> Prediction:
    """The proposal's cost with each compartment's chosen mechanism, and with each other
    calibrated mechanism it can use."""
    priced = {
        c.name: [
            d
            for d in dict.fromkeys((c.mechanism, *c.usable))
            if d == c.mechanism or (d in costs.gates and c.usable[d] is None)
        ]
        for c in proposal.compartments
    }
    runs = proposal.runs.runs
    shares = [_recorder_share(run.data, costs.monitoring_event_s) for run in runs]
    added: dict[str, dict[str, float]] = {name: dict.fromkeys(drivers, 0.0) for name, drivers in priced.items()}
    crossings: dict[str, int] = dict.fromkeys(priced, 0)
    carried: dict[str, int] = dict.fromkeys(priced, 0)
    started: dict[str, set[int]] = {name: set() for name in priced}
    window: dict[int, list[float]] = {}
    for edge in proposal.runs.edges().values():
        caller, callee = proposal.compartment_of_unit(edge.caller), proposal.compartment_of_unit(edge.callee)
        if caller == callee:
            continue
        charged = callee if callee != DEFAULT else caller
        for run, (calls, size, first, last) in edge.per_run.items():
            crossings[charged] += calls
            carried[charged] += size
            for driver in priced[charged]:
                gate = costs.gates[driver]
                added[charged][driver] += calls * gate.call_s + size * gate.byte_s
            started[charged].add(run)
            span = window.setdefault(run, [first, last])
            span[0], span[1] = min(span[0], first), max(span[1], last)
    # The traced work in CPU time, as long as it takes by the wall clock on the machine as calibrated
    # (the gates' costs are wall time, measured under the same load).
    cpu_work = max(1e-4, sum((last - first) * (1 - shares[run]) for run, (first, last) in window.items()))
    work = cpu_work * costs.stretch
    chosen = {c.name: c.mechanism for c in proposal.compartments}
    rows = [
        CompartmentCost(
            name,
            chosen[name],
            crossings[name],
            carried[name],
            added[name][chosen[name]],
            len(started[name]),
            (work + added[name][chosen[name]]) / work,
            {driver: (work + seconds) / work for driver, seconds in added[name].items() if driver != chosen[name]},
        )
        for name in priced
    ]
    total = sum(row.added_s for row in rows)
    base = sum(  # a run from start to end: Python's start, then the app's wall time less the recorder's
        costs.python_start_s + max(0.0, run.data["wall_seconds"] - share * run.data["cpu_seconds"])
        for run, share in zip(runs, shares, strict=True)
    )
    extra = (
        total + sum(row.starts * costs.gates[row.mechanism].start_s for row in rows) + len(runs) * costs.flexos_run_s
    )
    return Prediction(
        rows, cpu_work, (work + total) / work, (base + extra) / base if base > 0 else 1.0, max(shares, default=0.0)
    )


def main() -> None:
    print(json.dumps(_calibrate(sys.argv[1:])))


if __name__ == "__main__":
    main()
