"""Replay FlexOS's measured Redis configurations as a benchmark for ``flexos explore``.

FlexOS (ASPLOS'22, figures 6 and 8) measured Redis GET throughput in 80 configurations: redis,
newlib, uksched and lwip in up to three MPK compartments, each library with or without software
hardening (SFI). Given a generated flexos.yaml, this benchmark answers with the throughput FlexOS
measured for the same partition and hardening (CHUNK 5, METHOD GET): run ``FLEXOS_REPEAT=k``
answers FlexOS's iteration ``k mod 5 + 1``, so the mean of 5 runs is FlexOS's mean. A library
counts as hardened when its flexos.yaml entry has ``hardening`` (replay_redis.yaml's toggle ``H``,
an audit policy, stands for SFI). Run::

    FLEXOS_CONFIG=FILE .venv/bin/python bench/replay_redis.py   # one configuration: prints req/s
                                                                 # (FLEXOS_REPLAY_LOG=FILE: also log the
                                                                 # run's host, start and end there, in
                                                                 # seconds since boot, the run lasting
                                                                 # FLEXOS_REPLAY_SECONDS)
    .venv/bin/python bench/replay_redis.py [--data DIR]          # the exploration side by side with
                                                                 # measuring all 80 (FlexOS's way)

The data is ``bench/data/flexos-asplos22-redis/`` (or ``--data DIR`` / ``FLEXOS_REDIS_DATA``),
copied from the public artifact project-flexos/asplos22-ae.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

HERE = Path(__file__).resolve().parent
SPACE = HERE / "replay_redis.yaml"
DATA = HERE / "data" / "flexos-asplos22-redis"
# flexos.yaml module name -> the column prefix in redis-perm.csv
LIBRARIES = {"redis": "LIBREDIS", "newlib": "LIBNEWLIB", "uksched": "LIBUKSCHED", "lwip": "LIBLWIP"}
CHUNK, METHOD = "5", "GET"  # what FlexOS plotted
HOSTS = (1, 2, 4, 8)  # how many configurations the search measures at once, in compare()

Key = tuple[frozenset[frozenset[str]], frozenset[str]]  # (partition of the libraries, hardened ones)


def data_dir(given: str | None = None) -> Path:
    return Path(given or os.environ.get("FLEXOS_REDIS_DATA") or DATA)


def load_data(directory: Path) -> dict[Key, list[float]]:
    """The 80 valid configurations (NUM_COMPARTMENTS 3, lwip in compartment <= 2, compartment 3 used
    only if 2 is) -> FlexOS's GET throughput per iteration, in iteration order."""
    runs: dict[str, dict[int, float]] = {}
    with (directory / "redis-res.csv").open() as stream:
        for row in csv.DictReader(stream):
            if row["CHUNK"] == CHUNK and row["METHOD"] == METHOD:
                runs.setdefault(row["TASKID"], {})[int(row["ITERATION"])] = float(row["VALUE"])
    found: dict[Key, list[float]] = {}
    with (directory / "redis-perm.csv").open() as stream:
        for row in csv.DictReader(stream):
            where = {lib: int(row[f"{col}_COMPARTMENT"]) for lib, col in LIBRARIES.items()}
            used = set(where.values())
            if row["NUM_COMPARTMENTS"] != "3" or where["lwip"] > 2 or (3 in used and 2 not in used):
                continue
            blocks: dict[int, set[str]] = {}
            for lib, number in where.items():
                blocks.setdefault(number, set()).add(lib)
            hardened = frozenset(lib for lib, col in LIBRARIES.items() if row[f"{col}_SFI"] == "y")
            key = (frozenset(frozenset(b) for b in blocks.values()), hardened)
            found[key] = [runs[row["TASKID"]][i] for i in sorted(runs[row["TASKID"]])]
    return found


def key_of(document: dict[str, Any]) -> Key:
    """The partition and hardening a flexos.yaml document gives the four libraries."""
    libraries = document.get("libraries") or {}
    missing = [lib for lib in LIBRARIES if lib not in libraries]
    if missing:
        raise SystemExit(f"replay_redis: the flexos.yaml places no {', '.join(missing)}; use bench/replay_redis.yaml")
    blocks: dict[str, set[str]] = {}
    for lib in LIBRARIES:
        blocks.setdefault(libraries[lib]["compartment"], set()).add(lib)
    hardened = frozenset(lib for lib in LIBRARIES if libraries[lib].get("hardening"))
    return frozenset(frozenset(b) for b in blocks.values()), hardened


def metric(runs: list[float], run: int | None) -> float:
    """Iteration ``run mod len(runs)``, or the mean of all when no run is given."""
    return statistics.fmean(runs) if run is None else runs[run % len(runs)]


def replay(config_path: str, directory: Path) -> float:
    document = YAML(typ="safe", pure=True).load(Path(config_path).read_text())
    runs = load_data(directory).get(key_of(document))
    if runs is None:
        raise SystemExit(f"replay_redis: {config_path} is none of FlexOS's 80 measured configurations")
    repeat = os.environ.get("FLEXOS_REPEAT")
    return metric(runs, int(repeat) if repeat is not None else None)


def since_boot() -> float:
    """Now, in seconds since boot: the clock process start times are kept in."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def process_start() -> float:
    """When this process started (before Python's own startup), in seconds since boot."""
    fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # starttime, field 22 of proc(5)


def log_run(log: Path, config_path: str, event: str, **times: float) -> None:
    """Append this run's ``event`` (start, end) with its configuration, repeat and host to ``log``:
    how tests see that no two runs shared a host at once, and which host is busy."""
    entry = {
        "event": event,
        "config": Path(config_path).stem,
        "repeat": os.environ.get("FLEXOS_REPEAT"),
        "node": os.environ.get("FLEXOS_NODE"),
        "hostname": socket.gethostname(),
        **times,
    }
    with log.open("a") as stream:  # one short write per line: lines of concurrent runs do not interleave
        stream.write(json.dumps(entry) + "\n")


def compare(directory: Path) -> None:
    """Explore the replayed space under both orders and many budgets, on 1 to 8 hosts, beside measuring everything."""
    from flexos.explore.order import documented_order, read_order, safety_facts
    from flexos.explore.search import Goal, search
    from flexos.explore.space import load_space

    data = load_data(directory)
    space, _ = load_space(SPACE)
    configs = space.configurations()
    runs = [data[key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    orders = {
        "documented": documented_order(configs),
        "poset.dot": read_order(directory / "poset.dot", space, configs),
    }
    print(f"FlexOS's Redis space: {len(configs)} configurations; FlexOS measured all of them.")
    print("measured (batches) with 1 host, then with 2, 4 and 8 hosts measuring a batch at a time")
    hosts = "".join(f"  {f'{h} hosts':>8}" for h in HOSTS[1:])
    print(f"{'budget':>8}  {'order':<10}  {'stars':>5}  {'1 host':>12}{hosts}  = all")
    for budget in range(300_000, 1_100_001, 50_000):
        goal = Goal(budget, higher_is_better=True, statistic="mean")
        for name, order in orders.items():
            found = {hosts: search(order, goal, facts, lambda i: runs[i], batch=hosts) for hosts in HOSTS}
            brute = search(order, goal, facts, lambda i: runs[i], exhaustive=True)
            same = all(sorted(a.stars) == sorted(brute.stars) for a in found.values())
            sequential = len(found[1].measured)
            cells = [f"{sequential:>2} ({sequential / len(configs):.0%})"]
            cells += [f"{len(found[h].measured):>2} ({found[h].batches:>2})" for h in HOSTS[1:]]
            print(
                f"{budget:>8}  {name:<10}  {len(found[1].stars):>5}  {cells[0]:>12}  {cells[1]:>8}  {cells[2]:>8}  "
                f"{cells[3]:>8}  {'yes' if same else 'NO'}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="directory with redis-perm.csv, redis-res.csv and poset.dot")
    args = parser.parse_args()
    directory = data_dir(args.data)
    if not (directory / "redis-perm.csv").exists():
        raise SystemExit(f"replay_redis: no FlexOS data in {directory} (pass --data DIR)")
    config = os.environ.get("FLEXOS_CONFIG")
    if config:
        log = Path(os.environ["FLEXOS_REPLAY_LOG"]) if os.environ.get("FLEXOS_REPLAY_LOG") else None
        started = process_start()  # the run began when the command started it, not when this line ran
        if log:
            log_run(log, config, "start", start=started)
        value = replay(config, directory)
        if log:
            time.sleep(max(0.0, float(os.environ.get("FLEXOS_REPLAY_SECONDS", "0")) - (since_boot() - started)))
            log_run(log, config, "end", start=started, end=since_boot())
        print(f"{value:.2f}")
    else:
        compare(directory)


if __name__ == "__main__":
    sys.exit(main())
