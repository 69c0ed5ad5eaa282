"""``flexos trace``'s predicted slowdown beside the measured one, and what tracing itself costs.

For apps/kv, apps/http and examples/sqlite_notes: trace the smoke workload (bench/trace_workloads.py)
into a proposal, then run the workload plainly and under the proposal in alternating rounds and
compare. A server (kv, http) is judged per unit of work: its client's time per request, against
the prediction for the traced work; a short command (sqlite_notes) from start to end, against the
whole-run prediction. Run::

    .venv/bin/python bench/trace_predict.py [--quick] [--rounds N] [--apps kv,http,sqlite_notes] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trace_workloads as workloads

from flexos.trace.cost import calibration, predict
from flexos.trace.propose import propose
from flexos.trace.runs import Runs

# app -> (the size traced, the size measured): redis-benchmark requests, wrk seconds, repetitions
SIZES = {"kv": (2000, 20000), "http": (1, 3), "sqlite_notes": (1, 1)}
QUICK_SIZES = {"kv": (2000, 2000), "http": (1, 1), "sqlite_notes": (1, 1)}
SERVERS = {"kv", "http"}


def run_app(app: str, rounds: int, sizes: dict[str, tuple[int, int]], workdir: Path) -> dict:
    workload = workloads.WORKLOADS[app]
    traced_size, measured_size = sizes[app]
    # The proposal is traced and run where it is, in each run's own directory: a flexos.yaml's
    # relative paths (its database's directory, ./data) are read from the yaml's directory.
    proposal_file = workdir / "trace" / "flexos.yaml"
    calibration(["process", "subinterp"])  # cached first: the tracing column is the trace's, not a calibration's
    plain = workload([workloads.PYTHON], workdir / "plain-smoke", traced_size)
    traced = workload(
        [workloads.FLEXOS, "trace", "-o", str(proposal_file), "--write", "--"], workdir / "trace", traced_size
    )
    if traced.status != 0 or not proposal_file.exists():
        raise SystemExit(f"{app}: the traced run failed:\n{traced.stderr[-3000:]}")
    runs = Runs.load(proposal_file.with_name("flexos.trace.json"))
    proposal = propose(runs, str(proposal_file.parent))
    drivers = sorted({c.mechanism for c in proposal.compartments})
    measured: dict[str, list[float]] = {"plain": [], "proposal": []}
    predicted: list[float] = []
    for round_ in range(rounds):
        # The machine as it is in this round: calibrated again just before the runs it predicts
        # (on a shared machine the gate's round trip moves with the load).
        prediction = predict(proposal, calibration(drivers, again=True))
        predicted.append(prediction.slowdown if app in SERVERS else prediction.whole_run)
        order = ["plain", "proposal"] if round_ % 2 == 0 else ["proposal", "plain"]
        for kind in order:
            here = workdir / f"{kind}-{round_}"
            launcher = [workloads.PYTHON]
            if kind == "proposal":
                here.mkdir(parents=True)
                shutil.copy(proposal_file, here / "flexos.yaml")
                launcher = [workloads.FLEXOS, "run", "-c", str(here / "flexos.yaml")]
            result = workload(launcher, here, measured_size)
            if result.status != 0:
                raise SystemExit(f"{app} ({kind}) failed:\n{result.stderr[-3000:]}")
            measured[kind].append(result.seconds)
    ratios = [under / plain for plain, under in zip(measured["plain"], measured["proposal"], strict=True)]
    crossings = sum(row.crossings for row in prediction.compartments)
    return {
        "app": app,
        "compartments": {c.name: {"units": c.units, "mechanism": c.mechanism} for c in proposal.compartments},
        "crossings_traced": crossings,
        "predicted": statistics.median(predicted),
        "predicted_rounds": predicted,
        "measured": statistics.median(ratios),
        "measured_rounds": ratios,
        "plain_s": measured["plain"],
        "proposal_s": measured["proposal"],
        "tracing_overhead": traced.seconds / plain.seconds if plain.seconds else None,
        "recorder_share_estimate": prediction.overhead_share,
        "same_output": traced.output == plain.output,
    }


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x" if len(values) > 1 else f"{values[0]:.2f}x"


def report(rows: list[dict]) -> None:
    print(
        f"{'app':<14} {'compartments':<34} {'predicted':>9} {'measured':>9} {'ratio':>6}  within 2x  "
        f"{'predicted (rounds)':<18} {'measured (rounds)':<18} tracing"
    )
    for row in rows:
        names = ", ".join(f"{n}({'+'.join(c['units'])})" for n, c in row["compartments"].items())
        ratio = max(row["predicted"], row["measured"]) / min(row["predicted"], row["measured"])
        overhead = f"{row['tracing_overhead']:.1f}x" if row["tracing_overhead"] else "-"
        print(
            f"{row['app']:<14} {names[:34]:<34} {row['predicted']:>8.2f}x {row['measured']:>8.2f}x {ratio:>6.2f}"
            f"  {'yes' if ratio <= 2 else 'NO':<9}  {_span(row['predicted_rounds']):<18} "
            f"{_span(row['measured_rounds']):<18} {overhead}"
        )
    print(
        "medians over the rounds; each round calibrates, then runs plainly and under the proposal (measured: their"
        " ratio). servers: the client's time per request; sqlite_notes: its five commands, start to end"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--apps", default="kv,http,sqlite_notes")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else SIZES
    rounds = 1 if args.quick else args.rounds
    rows = []
    with tempfile.TemporaryDirectory(
        prefix="flexos-trace-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    ) as tmp:
        for app in args.apps.split(","):
            rows.append(run_app(app, rounds, sizes, Path(tmp) / app))
    report(rows)
    if args.json:
        meta = {"when": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version()}
        Path(args.json).write_text(json.dumps({"meta": {**meta, "load": os.getloadavg()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
