"""Replay FlexOS's measured Redis and Nginx configuration spaces as benchmarks for ``flexos explore``.

FlexOS (ASPLOS'22, figures 6 and 8) measured Redis GET throughput and Nginx request throughput in
80 configurations each: the app (redis or nginx), newlib, uksched and lwip in up to three MPK
compartments, each library with or without software hardening (SFI). Given a generated
flexos.yaml, this benchmark answers with the throughput FlexOS measured for the same partition and
hardening (CHUNK 5; METHOD GET for Redis, REQ for Nginx): run ``FLEXOS_REPEAT=k`` answers FlexOS's
iteration ``k mod 5 + 1``, so the mean of 5 runs is FlexOS's mean. The flexos.yaml says which app
it is (a library named ``redis`` or ``nginx``). A library counts as hardened when its flexos.yaml
entry has ``hardening`` (the spaces' toggle ``H``, an audit policy, stands for SFI). Run::

    FLEXOS_CONFIG=FILE .venv/bin/python bench/replay_redis.py   # one configuration: prints req/s
                                                                 # (FLEXOS_REPLAY_LOG=FILE: also log the
                                                                 # run's host, start and end there, in
                                                                 # seconds since boot, the run lasting
                                                                 # FLEXOS_REPLAY_SECONDS)
    .venv/bin/python bench/replay_redis.py [--app nginx] [--data DIR]
                                                                 # the exploration side by side with
                                                                 # measuring all 80 (FlexOS's way)

The data is ``bench/data/flexos-asplos22-redis/`` and ``bench/data/flexos-asplos22-nginx/`` (or
``--data DIR`` / ``FLEXOS_REDIS_DATA``), copied from the public artifact project-flexos/asplos22-ae.
The spaces are ``replay_redis.yaml`` and ``replay_nginx.yaml``; the search was developed on the
Redis space, and the Nginx space checks it on data it was not tuned on.
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
APPS = ("redis", "nginx")
# The app -> the column prefix of its library in APP-perm.csv and the METHOD FlexOS plotted.
APP_COLUMN = {"redis": ("LIBREDIS", "GET"), "nginx": ("LIBNGINX", "REQ")}
# The other libraries (flexos.yaml module name -> column prefix), the same in both spaces.
SYSTEM = {"newlib": "LIBNEWLIB", "uksched": "LIBUKSCHED", "lwip": "LIBLWIP"}
CHUNK = "5"  # what FlexOS plotted
HOSTS = (1, 2, 4, 8)  # how many configurations the search measures at once, in compare()
# The budgets compare() explores (req/s): across each space's range of throughput.
BUDGETS = {"redis": range(300_000, 1_100_001, 50_000), "nginx": range(35_000, 135_001, 5_000)}

Key = tuple[frozenset[frozenset[str]], frozenset[str]]  # (partition of the libraries, hardened ones)


def data_dir(given: str | None = None, app: str = "redis") -> Path:
    if app == "redis":
        return Path(given or os.environ.get("FLEXOS_REDIS_DATA") or DATA)
    return Path(given) if given else HERE / "data" / f"flexos-asplos22-{app}"


def space_file(app: str = "redis") -> Path:
    return HERE / f"replay_{app}.yaml"


def libraries_of(app: str) -> dict[str, str]:
    """flexos.yaml module name -> the column prefix in APP-perm.csv."""
    return {app: APP_COLUMN[app][0], **SYSTEM}


def load_data(directory: Path, app: str = "redis") -> dict[Key, list[float]]:
    """The 80 valid configurations (NUM_COMPARTMENTS 3, lwip in compartment <= 2, compartment 3 used
    only if 2 is) -> FlexOS's throughput per iteration, in iteration order."""
    libraries = libraries_of(app)
    method = APP_COLUMN[app][1]
    runs: dict[str, dict[int, float]] = {}
    with (directory / f"{app}-res.csv").open() as stream:
        for row in csv.DictReader(stream):
            if row["CHUNK"] == CHUNK and row["METHOD"] == method:
                runs.setdefault(row["TASKID"], {})[int(row["ITERATION"])] = float(row["VALUE"])
    found: dict[Key, list[float]] = {}
    with (directory / f"{app}-perm.csv").open() as stream:
        for row in csv.DictReader(stream):
            where = {lib: int(row[f"{col}_COMPARTMENT"]) for lib, col in libraries.items()}
            used = set(where.values())
            if row["NUM_COMPARTMENTS"] != "3" or where["lwip"] > 2 or (3 in used and 2 not in used):
                continue
            blocks: dict[int, set[str]] = {}
            for lib, number in where.items():
                blocks.setdefault(number, set()).add(lib)
            hardened = frozenset(lib for lib, col in libraries.items() if row[f"{col}_SFI"] == "y")
            key = (frozenset(frozenset(b) for b in blocks.values()), hardened)
            found[key] = [runs[row["TASKID"]][i] for i in sorted(runs[row["TASKID"]])]
    return found


def app_of(document: dict[str, Any]) -> str:
    """Which app's data a flexos.yaml document asks for: the one among its libraries (default redis)."""
    libraries = document.get("libraries") or {}
    return next((app for app in APPS if app in libraries), "redis")


def key_of(document: dict[str, Any]) -> Key:
    """The partition and hardening a flexos.yaml document gives the four libraries."""
    libraries = document.get("libraries") or {}
    wanted = libraries_of(app_of(document))
    missing = [lib for lib in wanted if lib not in libraries]
    if missing:
        raise SystemExit(
            f"replay_redis: the flexos.yaml places no {', '.join(missing)}; use bench/replay_redis.yaml "
            "or bench/replay_nginx.yaml"
        )
    blocks: dict[str, set[str]] = {}
    for lib in wanted:
        blocks.setdefault(libraries[lib]["compartment"], set()).add(lib)
    hardened = frozenset(lib for lib in wanted if libraries[lib].get("hardening"))
    return frozenset(frozenset(b) for b in blocks.values()), hardened


def metric(runs: list[float], run: int | None) -> float:
    """Iteration ``run mod len(runs)``, or the mean of all when no run is given."""
    return statistics.fmean(runs) if run is None else runs[run % len(runs)]


def replay(config_path: str, directory: Path | None) -> float:
    document = YAML(typ="safe", pure=True).load(Path(config_path).read_text())
    app = app_of(document)
    runs = load_data(directory or data_dir(app=app), app).get(key_of(document))
    if runs is None:
        raise SystemExit(f"replay_redis: {config_path} is none of FlexOS's 80 measured {app} configurations")
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
        "cwd": os.getcwd(),  # where the engine ran it (on a cluster: the job's shipped working_dir)
        "config_path": config_path,
        **times,
    }
    with log.open("a") as stream:  # one short write per line: lines of concurrent runs do not interleave
        stream.write(json.dumps(entry) + "\n")


def compare(directory: Path, app: str = "redis") -> None:
    """Explore the replayed space under its orders and many budgets, on 1 to 8 hosts, beside measuring everything."""
    from flexos.explore.order import documented_order, read_order, safety_facts
    from flexos.explore.search import Goal, search
    from flexos.explore.space import load_space

    data = load_data(directory, app)
    space, _ = load_space(space_file(app))
    configs = space.configurations()
    runs = [data[key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    orders = {"documented": documented_order(configs)}
    if (directory / "poset.dot").exists():  # FlexOS drew its order for Redis only
        orders["poset.dot"] = read_order(directory / "poset.dot", space, configs)
    print(f"FlexOS's {app} space: {len(configs)} configurations; FlexOS measured all of them.")
    print("measured (batches) with 1 host, then with 2, 4 and 8 hosts measuring a batch at a time")
    hosts = "".join(f"  {f'{h} hosts':>8}" for h in HOSTS[1:])
    print(f"{'budget':>8}  {'order':<10}  {'stars':>5}  {'1 host':>12}{hosts}  = all")
    totals = {(name, h): [0, 0] for name in orders for h in HOSTS}
    for budget in BUDGETS[app]:
        goal = Goal(budget, higher_is_better=True, statistic="mean")
        for name, order in orders.items():
            found = {hosts: search(order, goal, facts, lambda i: runs[i], batch=hosts) for hosts in HOSTS}
            brute = search(order, goal, facts, lambda i: runs[i], exhaustive=True)
            same = all(sorted(a.stars) == sorted(brute.stars) for a in found.values())
            sequential = len(found[1].measured)
            for h in HOSTS:
                totals[name, h][0] += len(found[h].measured)
                totals[name, h][1] += found[h].batches
            cells = [f"{sequential:>2} ({sequential / len(configs):.0%})"]
            cells += [f"{len(found[h].measured):>2} ({found[h].batches:>2})" for h in HOSTS[1:]]
            print(
                f"{budget:>8}  {name:<10}  {len(found[1].stars):>5}  {cells[0]:>12}  {cells[1]:>8}  {cells[2]:>8}  "
                f"{cells[3]:>8}  {'yes' if same else 'NO'}"
            )
    for name in orders:  # the table's last row: measured (batches) over all budgets
        count = len(BUDGETS[app]) * len(configs)
        cells = ", ".join(f"{h} host{'s' * (h > 1)} {totals[name, h][0]} ({totals[name, h][1]})" for h in HOSTS)
        print(f"all {len(BUDGETS[app])} budgets, {name}: {cells}; on 1 host {totals[name, 1][0] / count:.1%} measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=APPS, default="redis", help="which of FlexOS's spaces to compare")
    parser.add_argument("--data", help="directory with APP-perm.csv, APP-res.csv (and poset.dot for redis)")
    args = parser.parse_args()
    config = os.environ.get("FLEXOS_CONFIG")
    directory = data_dir(args.data, args.app)
    if not config and not (directory / f"{args.app}-perm.csv").exists():
        raise SystemExit(f"replay_redis: no FlexOS data in {directory} (pass --data DIR)")
    if config:
        log = Path(os.environ["FLEXOS_REPLAY_LOG"]) if os.environ.get("FLEXOS_REPLAY_LOG") else None
        started = process_start()  # the run began when the command started it, not when this line ran
        if log:
            log_run(log, config, "start", start=started)
        value = replay(config, Path(args.data) if args.data else None)
        if log:
            time.sleep(max(0.0, float(os.environ.get("FLEXOS_REPLAY_SECONDS", "0")) - (since_boot() - started)))
            log_run(log, config, "end", start=started, end=since_boot())
        print(f"{value:.2f}")
    else:
        compare(directory, args.app)


if __name__ == "__main__":
    sys.exit(main())
