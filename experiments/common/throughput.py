"""kv and http throughput with real clients, per configuration: ``python -m experiments.common.throughput kv|http``.

kv is driven by redis-benchmark with FlexOS's parameters (``-n 100000 -c 30 -k 1 -P 16 -t
get,set``), http by wrk (``-c 30 -d 10s``, the rendered page ``/``). Every configuration in
``apps/APP/configs`` (except the debugging ``strict`` one) runs beside no flexos, alternating over
rounds; the result is each one's median requests per second and its ratio to no flexos. These
functions are also what the fig-06 experiment measures each configuration with.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from experiments.common.apps import AppProcess, Variant, rotated, usable_variants
from experiments.common.clients import redis_benchmark, wrk
from experiments.common.paths import APPS
from experiments.common.steps import require_tools
from experiments.common.tables import print_table, write_csv

TARGETS = {("kv", "parser-process"): 0.85, ("kv", "persistence-process"): 0.85}  # at least x no flexos


def variants(app: str) -> list[Variant]:
    """No flexos, then every configuration of the app (strict is a debugging image, not a deployment)."""
    found = [Variant("none", "no flexos", None, "none")]
    for path in sorted((APPS / app / "configs").glob("*.yaml")):
        key = path.stem
        if key != "strict":
            kind = "fcalls" if key == "fcalls" else key.split("-", 1)[1] if "-" in key else key
            found.append(Variant(key, key, path.name, kind))
    return found


def kv_throughput(variant: Variant, workdir: Path, requests: int = 100_000) -> dict[str, float]:
    """Requests per second of SET and GET, and their mean, for one kv configuration."""
    with AppProcess("kv", variant, ["--port", "0", "--persistence", "aof"], workdir) as server:
        rates = redis_benchmark(server.wait_listening(), requests=requests)
    return {"SET": rates["SET"], "GET": rates["GET"], "rps": statistics.mean(rates.values())}


def http_throughput(variant: Variant, workdir: Path, seconds: float = 10, path: str = "/") -> dict[str, float]:
    """Requests per second for one http configuration."""
    with AppProcess("http", variant, ["--port", "0"], workdir) as server:
        return {"rps": wrk(server.wait_listening(), path, seconds=seconds)["rps"]}


def compare(app: str, rounds: int, size: float) -> list[dict]:
    """Every configuration of ``app`` beside no flexos, alternating over ``rounds``."""
    require_tools(("redis-benchmark", "redis-tools"), ("wrk", "wrk"))
    runs: dict[str, list[float]] = {}
    usable, skipped = usable_variants(app, variants(app))
    notes = {key: f"skipped: {reason}" for key, reason in skipped.items()}
    workdir = Path(tempfile.mkdtemp(prefix=f"{app}-throughput-", dir="/dev/shm"))
    try:
        for r in range(rounds):
            for variant in rotated(usable, r):
                if variant.key in notes:
                    continue
                try:
                    if app == "kv":
                        result = kv_throughput(variant, workdir / variant.key, int(size))
                    else:
                        result = http_throughput(variant, workdir / variant.key, size)
                except RuntimeError as exc:
                    notes[variant.key] = f"failed: {str(exc).splitlines()[-1]}"
                    print(f"  round {r} {variant.key:<30} FAILED: {exc}")
                    continue
                runs.setdefault(variant.key, []).append(result["rps"])
                print(f"  round {r} {variant.key:<30} {result['rps']:>10.0f} req/s  (load {os.getloadavg()[0]:.1f})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(runs["none"]) if runs.get("none") else None
    rows = []
    for variant in variants(app):
        values = runs.get(variant.key, [])
        median = statistics.median(values) if values else None
        ratio = median / base if median is not None and base else None
        target = TARGETS.get((app, variant.key))
        rows.append(
            {
                "app": app,
                "config": variant.key,
                "median_rps": "" if median is None else f"{median:.0f}",
                "x_no_flexos": "" if ratio is None else f"{ratio:.2f}",
                "rounds_rps": " ".join(f"{v:.0f}" for v in values),
                "target": "" if target is None else f">= {target}",
                "met": "" if target is None or ratio is None else ("yes" if ratio >= target else "no"),
                "note": notes.get(variant.key, ""),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=["kv", "http"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--smoke", action="store_true", help="small runs (CI)")
    parser.add_argument("--csv", type=Path, help="also write the table to this CSV file")
    args = parser.parse_args()
    size = (2000 if args.app == "kv" else 1) if args.smoke else (100_000 if args.app == "kv" else 10)
    rows = compare(args.app, 1 if args.smoke else args.rounds, size)
    print_table(
        ["configuration", "median req/s", "x no flexos", "target", "met", "note"],
        [[r["config"], r["median_rps"], r["x_no_flexos"], r["target"], r["met"], r["note"][:70]] for r in rows],
    )
    if args.csv:
        write_csv(args.csv, rows)


if __name__ == "__main__":
    main()
