"""Round-trip latency of a small call ``f(x) -> x`` through flexos gates and through peer RPC stacks,
in each of three placements.

A gate's cost depends on where its peer runs, so every mechanism is measured in each placement:

- ``quiet``: nothing else runs; the peer is free to run on another CPU;
- ``one-cpu``: the benchmark and every peer it starts are confined to one CPU (as
  ``taskset -c 0`` or a one-CPU container would);
- ``busy``: one CPU-bound process per CPU competes with them.

Within a placement every mechanism is measured in the same run, in alternating rounds (the order
rotates each round), so that machine drift hits all of them alike. Each call is timed on its own
with ``perf_counter_ns``; a mechanism's median is the median of its round medians and its p99 is
taken over all of its timed calls. Each placement runs in a fresh process (affinity is inherited
by the peers it starts). Run::

    .venv/bin/python bench/gate_latency.py [--placement quiet|one-cpu|busy ...] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from pathlib import Path

import rpyc
from rpyc.utils.factory import unix_connect
from rpyc.utils.server import ThreadedServer

import flexos
from flexos import CompartmentSpec, Image
from flexos.drivers import unavailable as driver_unavailable

ECHO_SOURCE = '''"""A one-function library for the gate latency benchmark."""


def f(x):
    return x
'''

# mechanism key -> label printed in the table
MECHANISMS = {
    "direct": "direct Python call",
    "fcalls": "flexos fcalls (non-strict)",
    "fcalls_strict": "flexos fcalls strict",
    "process": "flexos process",
    "subinterp": "flexos subinterp",
    "stdlib_interp": "stdlib _interpreters.call (3.13)",
    "managers": "multiprocessing.managers proxy",
    "rpyc": "RPyC (unix socket, cached netref)",
}

# Goals as the project states them, per placement: (label, value function, comparison, threshold, unit)
Goal = tuple[str, Callable[[dict[str, float]], float], str, float, str]
GOALS: dict[str, list[Goal]] = {
    "quiet": [
        ("process gate median", lambda m: m["process"], "<=", 2.5, "us"),
        ("process gate vs managers", lambda m: m["managers"] / m["process"], ">=", 6.0, "x faster"),
        ("process gate vs RPyC", lambda m: m["rpyc"] / m["process"], ">=", 20.0, "x faster"),
        ("subinterp gate median", lambda m: m["subinterp"], "<=", 1.2, "us"),
        ("fcalls strict median", lambda m: m["fcalls_strict"], "<=", 1.0, "us"),
        ("fcalls vs direct", lambda m: m["fcalls"] / m["direct"], "<=", 1.2, "x direct"),
    ],
    "one-cpu": [
        ("process gate median", lambda m: m["process"], "<=", 10.0, "us"),
        ("process gate vs managers", lambda m: m["managers"] / m["process"], ">=", 2.0, "x faster"),
    ],
    "busy": [
        ("process gate vs managers", lambda m: m["managers"] / m["process"], ">=", 2.0, "x faster"),
    ],
}
PLACEMENTS = tuple(GOALS)
# Mechanisms this machine's Python may lack (subinterpreters need 3.13): key -> why not.
UNAVAILABLE: dict[str, str] = {}
if driver_unavailable("subinterp"):
    UNAVAILABLE["subinterp"] = UNAVAILABLE["stdlib_interp"] = driver_unavailable("subinterp")
    del MECHANISMS["subinterp"], MECHANISMS["stdlib_interp"]
    GOALS = {where: [goal for goal in goals if "subinterp" not in goal[0]] for where, goals in GOALS.items()}


def _noop() -> None:
    """What the stdlib peer runs in its subinterpreter (``_interpreters.call`` passes no arguments)."""


class Echo:
    """The object a multiprocessing manager serves."""

    def f(self, x):
        return x


class EchoManager(BaseManager):
    """A manager serving :class:`Echo` objects."""


EchoManager.register("Echo", Echo)


class EchoService(rpyc.Service):
    """The RPyC service: exposes ``f``."""

    def exposed_f(self, x):
        return x


def serve_rpyc(socket_path: str) -> None:
    """Run an RPyC server on a unix socket until terminated (the child process's target)."""
    ThreadedServer(EchoService, socket_path=socket_path).start()


def time_calls(f: Callable[[int], int], n: int) -> list[int]:
    """Time ``n`` calls ``f(1)`` one by one; nanoseconds per call."""
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        f(1)
        samples[i] = clock() - start
    return samples


def timer_overhead_ns(n: int = 20000) -> float:
    """Median cost of the timing itself (two clock reads), included in every sample."""
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        samples[i] = clock() - start
    return statistics.median(samples)


def percentile(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Peers:
    """Starts every mechanism and hands out its callable; stops them all on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.calls: dict[str, Callable[[int], int]] = {}
        self._manager: EchoManager | None = None
        self._rpyc_proc: multiprocessing.Process | None = None
        self._rpyc_conn = None
        self._runtime: flexos.Runtime | None = None
        self._stdlib_interp: int | None = None

    def __enter__(self) -> Peers:
        try:
            self._start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        # Peers first, while this process has no flexos threads.
        self._manager = EchoManager(ctx=ctx)
        self._manager.start()
        self.calls["managers"] = self._manager.Echo().f

        socket_path = str(self.workdir / "rpyc.sock")
        self._rpyc_proc = ctx.Process(target=serve_rpyc, args=(socket_path,), daemon=True)
        self._rpyc_proc.start()
        deadline = time.monotonic() + 30
        while self._rpyc_conn is None:  # its socket exists once bound, and takes connections once listening
            if time.monotonic() > deadline or not self._rpyc_proc.is_alive():
                raise RuntimeError("the RPyC server did not start")
            try:
                self._rpyc_conn = unix_connect(socket_path)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.01)
        self.calls["rpyc"] = self._rpyc_conn.root.f  # a cached netref to the remote function

        self._boot_flexos()

    def _boot_flexos(self) -> None:
        placements = {
            "fcalls": ("fcalls", {}),
            "fcalls_strict": ("fcalls", {"strict": True}),
            "process": ("process", {}),
        }
        if "subinterp" in MECHANISMS:
            import _interpreters

            placements["subinterp"] = ("subinterp", {})
            interp = _interpreters.create("isolated")
            self._stdlib_interp = interp
            call = _interpreters.call
            self.calls["stdlib_interp"] = lambda x: (call(interp, _noop), x)[1]
        for key in ("direct", *placements):
            (self.workdir / f"flexos_bench_echo_{key}.py").write_text(ECHO_SOURCE)
        sys.path.insert(0, str(self.workdir))  # compartment processes inherit sys.path
        # The baseline is the same source as a plain, unplaced module.
        self.calls["direct"] = __import__("flexos_bench_echo_direct").f
        compartments = {"app": CompartmentSpec("app", "fcalls", default=True)}
        libraries = {}
        for key, (driver, options) in placements.items():
            compartments[key] = CompartmentSpec(key, driver, options)
            libraries[f"flexos_bench_echo_{key}"] = key
        self._runtime = flexos.boot(Image(compartments=compartments, libraries=libraries, source="<gate_latency>"))
        for key in placements:
            module = __import__(f"flexos_bench_echo_{key}")
            self.calls[key] = module.f

    def __exit__(self, *exc: object) -> None:
        if self._runtime is not None:
            self._runtime.stop()
        if self._stdlib_interp is not None:
            import _interpreters

            _interpreters.destroy(self._stdlib_interp)
        if self._rpyc_conn is not None:
            self._rpyc_conn.close()
        if self._rpyc_proc is not None:
            self._rpyc_proc.terminate()
            self._rpyc_proc.join(5)
        if self._manager is not None:
            self._manager.shutdown()


def _spin_forever() -> None:
    while True:
        pass


def run(placement: str, warmup: int, calls: int, rounds: int) -> dict:
    """Measure every mechanism in alternating rounds in ``placement`` (this process is the one
    the placement is made for); return the results as a dict."""
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "one-cpu":
        os.sched_setaffinity(0, {cpus[0]})
    hogs = []
    if placement == "busy":
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in cpus]
    try:
        return _measure(placement, warmup, calls, rounds)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _measure(placement: str, warmup: int, calls: int, rounds: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexos-bench-"))
    try:
        with Peers(workdir) as peers:
            for key in MECHANISMS:
                assert peers.calls[key](7) == 7, key
                time_calls(peers.calls[key], warmup)
            overhead = timer_overhead_ns()
            per_round = max(1, calls // rounds)
            round_medians: dict[str, list[float]] = {key: [] for key in MECHANISMS}
            pooled: dict[str, list[int]] = {key: [] for key in MECHANISMS}
            order = list(MECHANISMS)
            for r in range(rounds):
                for key in order[r % len(order) :] + order[: r % len(order)]:
                    f = peers.calls[key]
                    time_calls(f, min(50, warmup))  # wake a peer that went to sleep meanwhile
                    samples = time_calls(f, per_round)
                    round_medians[key].append(statistics.median(samples))
                    pooled[key].extend(samples)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    medians = {key: statistics.median(round_medians[key]) / 1000 for key in MECHANISMS}
    results = {
        key: {
            "label": MECHANISMS[key],
            "median_us": medians[key],
            "p99_us": percentile(pooled[key], 0.99) / 1000,
            "x_direct": medians[key] / medians["direct"],
            "round_medians_us": [m / 1000 for m in round_medians[key]],
        }
        for key in MECHANISMS
    }
    goals = []
    for label, value_of, comparison, threshold, unit in GOALS[placement]:
        value = value_of(medians)
        met = value >= threshold if comparison == ">=" else value <= threshold
        goals.append({"goal": label, "value": value, "target": f"{comparison} {threshold:g} {unit}", "met": met})
    return {
        "placement": placement,
        "cpus": len(os.sched_getaffinity(0)),
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "warmup": warmup,
        "calls": per_round * rounds,
        "rounds": rounds,
        "timer_overhead_us": overhead / 1000,
        "mechanisms": results,
        "goals": goals,
    }


PLACEMENT_TITLES = {
    "quiet": "quiet: the peer free to run on another CPU",
    "one-cpu": "one CPU: the benchmark and its peers confined to one CPU",
    "busy": "busy: one CPU-bound process per CPU competes",
}


def report(result: dict) -> None:
    first = next(iter(result["placements"].values()))
    print(
        f"gate latency, f(x) -> x: {first['calls']} timed calls per mechanism in {first['rounds']} alternating "
        f"rounds after {first['warmup']} warm-up; Python {first['python']}, {first['machine']}"
    )
    print(f"(every sample includes ~{first['timer_overhead_us']:.3f} us of timer overhead)")
    for placement, measured in result["placements"].items():
        print(f"\n== {PLACEMENT_TITLES[placement]}")
        print(f"{'mechanism':<36} {'median us':>10} {'p99 us':>10} {'x direct':>10}   round medians min-max us")
        for row in measured["mechanisms"].values():
            spread = f"{min(row['round_medians_us']):.3f}-{max(row['round_medians_us']):.3f}"
            print(
                f"{row['label']:<36} {row['median_us']:>10.3f} {row['p99_us']:>10.3f} {row['x_direct']:>10.1f}   "
                f"{spread}"
            )
        for key, reason in UNAVAILABLE.items():
            print(f"{key:<36} not measured: {reason}")
    print()
    for placement, measured in result["placements"].items():
        for goal in measured["goals"]:
            unit = "us" if goal["target"].endswith("us") else "x"
            verdict = "PASS" if goal["met"] else "MISS"
            label = f"{placement}: {goal['goal']}"
            print(f"{verdict}  {label:<36} {goal['value']:>8.2f} {unit:<3} (goal {goal['target']})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2000, help="untimed calls per mechanism first (2000)")
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per mechanism (20000)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds the timed calls are split in (10)")
    parser.add_argument(
        "--placement", action="append", choices=PLACEMENTS, help="measure only these placements (default: all three)"
    )
    parser.add_argument("--quick", action="store_true", help="a small run for CI smoke tests")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--one", choices=PLACEMENTS, help=argparse.SUPPRESS)  # a child measuring one placement
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.calls, args.rounds = 100, 400, 2
    if args.one:
        print(json.dumps(run(args.one, args.warmup, args.calls, args.rounds)))
        return
    placements = {}
    for placement in args.placement or PLACEMENTS:
        counts = ["--warmup", str(args.warmup), "--calls", str(args.calls), "--rounds", str(args.rounds)]
        child = subprocess.run(
            [sys.executable, __file__, "--one", placement, *counts], capture_output=True, text=True, check=False
        )
        if child.returncode:
            raise SystemExit(f"the {placement} placement failed:\n{child.stderr}")
        placements[placement] = json.loads(child.stdout.splitlines()[-1])
    result = {"benchmark": "gate_latency", "placements": placements}
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
