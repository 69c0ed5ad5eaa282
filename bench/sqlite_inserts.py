"""SQLite INSERTs with sqlite3 placed in a compartment: the analog of FlexOS's figure 10.

Each configuration runs in its own fresh Python process (its own import of sqlite3 and, when used,
its own flexos runtime), which performs N INSERTs through the stdlib ``sqlite3`` module in
autocommit mode (every INSERT is its own transaction) into a new database file on tmpfs. The
configurations alternate over several rounds; each one's result is the median of its rounds. Run::

    .venv/bin/python bench/sqlite_inserts.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from flexos.drivers import unavailable

# configuration key -> (label, driver and options of sqlite3's compartment, or None for no flexos)
CONFIGS = {
    "none": ("no flexos", None),
    "fcalls": ("flexos fcalls (non-strict)", ("fcalls", {})),
    "fcalls_strict": ("flexos fcalls strict", ("fcalls", {"strict": True})),
    "process": ("flexos process", ("process", {})),
    "subinterp": ("flexos subinterp", ("subinterp", {})),
}
# Where this Python cannot run a driver, its row is left out and the reason printed (label -> why).
UNAVAILABLE: dict[str, str] = {}
for _key, (_label, _placement) in list(CONFIGS.items()):
    if _placement and (_reason := unavailable(_placement[0])):
        UNAVAILABLE[_label] = _reason
        del CONFIGS[_key]

# configuration -> the most it may cost relative to no flexos
GOAL_RATIOS = {"process": 1.3, "subinterp": 1.2}
# FlexOS (ASPLOS'22) figure 10, SQLite INSERTs relative to no isolation, for comparison.
FLEXOS_PAPER_RATIOS = {"FlexOS MPK3": 1.96, "FlexOS EPT2": 3.2}

INSERT_SQL = "INSERT INTO items (id, name, value) VALUES (?, ?, ?)"


def run_child(config: str, db_path: str, inserts: int) -> dict:
    """One configuration in this (fresh) process: boot, insert, verify; returns the timings."""
    started = time.perf_counter()
    runtime = None
    placement = CONFIGS[config][1]
    if placement is not None:
        import flexos
        from flexos import CompartmentSpec, Image

        driver, options = placement
        image = Image(
            compartments={
                "app": CompartmentSpec("app", "fcalls", default=True),
                "sqlite": CompartmentSpec("sqlite", driver, options),
            },
            libraries={"sqlite3": "sqlite", "_sqlite3": "sqlite"},
            source="<sqlite_inserts>",
        )
        runtime = flexos.boot(image)
    try:
        import sqlite3

        sqlite3_in = repr(sqlite3)
        connection = sqlite3.connect(db_path, isolation_level=None)  # autocommit: one transaction per INSERT
        connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value REAL)")
        setup_s = time.perf_counter() - started

        start = time.perf_counter()
        for i in range(inserts):
            connection.execute(INSERT_SQL, (i, f"item {i}", i * 0.5))
        inserts_s = time.perf_counter() - start

        count = connection.execute("SELECT count(*) FROM items").fetchone()[0]
        if count != inserts:
            raise SystemExit(f"expected {inserts} rows, found {count}")
        journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = connection.execute("PRAGMA synchronous").fetchone()[0]
        connection.close()
    finally:
        if runtime is not None:
            runtime.stop()
    return {
        "config": config,
        "sqlite3_in": sqlite3_in,
        "setup_s": setup_s,
        "inserts_s": inserts_s,
        "journal_mode": journal,
        "synchronous": synchronous,
    }


def run_config(config: str, db_dir: Path, inserts: int) -> dict:
    """Run one configuration in a fresh interpreter on a fresh database file."""
    db_path = db_dir / f"flexos-bench-{uuid.uuid4().hex}.db"
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", config, "--db", str(db_path), "--inserts", str(inserts)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"configuration {config!r} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(inserts: int, rounds: int, db_dir: Path) -> dict:
    """All configurations, alternating over ``rounds`` rounds; returns the results as a dict."""
    runs: dict[str, list[dict]] = {key: [] for key in CONFIGS}
    order = list(CONFIGS)
    for r in range(rounds):
        for key in order[r % len(order) :] + order[: r % len(order)]:
            runs[key].append(run_config(key, db_dir, inserts))
    baseline = statistics.median(run["inserts_s"] for run in runs["none"])
    results = {}
    for key, (label, _) in CONFIGS.items():
        median_s = statistics.median(run["inserts_s"] for run in runs[key])
        results[key] = {
            "label": label,
            "median_s": median_s,
            "us_per_insert": median_s / inserts * 1e6,
            "x_no_flexos": median_s / baseline,
            "setup_median_s": statistics.median(run["setup_s"] for run in runs[key]),
            "rounds_s": [run["inserts_s"] for run in runs[key]],
            "sqlite3_in": runs[key][0]["sqlite3_in"],
        }
    first = runs["none"][0]
    return {
        "benchmark": "sqlite_inserts",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "inserts": inserts,
        "rounds": rounds,
        "db_dir": str(db_dir),
        "journal_mode": first["journal_mode"],
        "synchronous": first["synchronous"],
        "configs": results,
        "goals": [
            {
                "goal": f"{key} vs no flexos",
                "value": results[key]["x_no_flexos"],
                "target": f"<= {limit}",
                "met": results[key]["x_no_flexos"] <= limit,
            }
            for key, limit in GOAL_RATIOS.items()
            if key in results
        ],
        "flexos_paper": FLEXOS_PAPER_RATIOS,
    }


def report(result: dict) -> None:
    print(
        f"sqlite3 INSERTs: {result['inserts']} INSERTs, one transaction each, DB in {result['db_dir']} "
        f"(journal_mode={result['journal_mode']}, synchronous={result['synchronous']}); "
        f"{result['rounds']} alternating rounds, one fresh process per run"
    )
    print(f"Python {result['python']}, {result['machine']}\n")
    columns = f"{'configuration':<28} {'median s':>9} {'us/insert':>10} {'x no flexos':>12} {'setup s':>8}"
    print(f"{columns}   rounds min-max s")
    for row in result["configs"].values():
        spread = f"{min(row['rounds_s']):.3f}-{max(row['rounds_s']):.3f}"
        print(
            f"{row['label']:<28} {row['median_s']:>9.4f} {row['us_per_insert']:>10.1f} "
            f"{row['x_no_flexos']:>12.2f} {row['setup_median_s']:>8.3f}   {spread}"
        )
    for label, ratio in result["flexos_paper"].items():
        print(f"{label + ' (paper, fig. 10)':<28} {'':>9} {'':>10} {ratio:>12.2f}")
    print("(setup s = boot + import sqlite3 + connect + CREATE TABLE, not included in the median)\n")
    for label, reason in UNAVAILABLE.items():
        print(f"{label:<28} not measured: {reason}")
    for goal in result["goals"]:
        verdict = "PASS" if goal["met"] else "MISS"
        print(f"{verdict}  {goal['goal']}: {goal['value']:.2f}x (goal {goal['target']}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=5000, help="INSERTs per run (5000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of all configurations (5)")
    parser.add_argument("--db-dir", type=Path, default=Path("/dev/shm"), help="where database files go (/dev/shm)")
    parser.add_argument("--quick", action="store_true", help="a small run for CI smoke tests")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.db, args.inserts)))
        return
    if args.quick:
        args.inserts, args.rounds = 200, 1
    if not args.db_dir.is_dir():
        parser.error(f"--db-dir {args.db_dir} is not a directory")
    result = run(args.inserts, args.rounds, args.db_dir)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
