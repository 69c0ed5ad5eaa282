"""A real local Ray cluster for tests/test_explore_ray.py, run inside a network namespace with only lo.

Outside a namespace Ray binds and contacts the machine's own interface address; inside one that has
only ``lo`` it binds 127.0.0.1 for every component. test_explore_ray.py runs this script as
``unshare -Urn sh -c 'ip link set lo up && exec python tests/explore_ray_cluster.py SCENARIO OUT'``;
it refuses to run where the namespace has an interface other than lo. Each scenario starts a
``ray.cluster_utils.Cluster`` whose nodes each offer one benchmark slot, explores, checks that every
socket in the namespace is on loopback, and writes what it saw to OUT (JSON) for the test to judge.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPLAY = ROOT / "bench" / "replay_redis.yaml"
SQLITE = ROOT / "examples" / "explore_sqlite" / "space.yaml"
FLEXOS = Path(sys.executable).parent / "flexos"
# Faster than Ray's defaults, so a killed node is declared dead within seconds.
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}


def interfaces() -> list[str]:
    """The network interfaces of this namespace besides lo (/proc/net/dev is per namespace, /sys is not)."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return [name for name in (line.split(":")[0].strip() for line in lines) if name != "lo"]


def foreign_sockets() -> list[str]:
    """Sockets in this namespace with an address outside loopback (listening on a wildcard counts)."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            local, remote = line.split()[1:3]
            for end, text in (("local", local), ("remote", remote)):
                address = _address(text)
                unset = end == "remote" and address.is_unspecified  # a listening socket's peer
                if not (address.is_loopback or unset):
                    found.append(f"{table} {end} {address}: {line.strip()}")
    return found


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(text.split(":")[0])
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    return address.ipv4_mapped or address


def cluster(nodes: list[dict[str, Any]]):
    """A Cluster: the head is the first node; every node has one CPU and the resources given."""
    from ray.cluster_utils import Cluster

    head, *workers = nodes
    loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    made = Cluster(
        initialize_head=True,
        head_node_args={**loopback, "include_dashboard": False, "_system_config": FAST_FAILURE, **head},
    )
    for node in workers:
        made.add_node(**loopback, **node)
    made.wait_for_nodes()
    return made


def slot(**features: float) -> dict[str, Any]:
    return {"resources": {"flexos_bench_slot": 1.0, **features}}


def scenario_stars(out: Path, budgets: list[int]) -> dict[str, Any]:
    """Three hosts explore the replayed Redis space at each budget (one cache, as a user would)."""
    from flexos.explore import explore

    made = cluster([slot(), slot(), slot()])
    try:
        answers = {}
        for budget in budgets:
            done = explore(REPLAY, budget, out=out / "explore", engine="ray", address=made.address)
            answers[budget] = {
                "stars": sorted(done.configs[i].name for i in done.answer.stars),
                "measured": len(done.answer.measured),
                "batches": done.answer.batches,
            }
        return {"answers": answers, "hosts": len(done.hosts), "foreign": foreign_sockets()}
    finally:
        made.shutdown()


def scenario_kill(out: Path, budget: int) -> dict[str, Any]:
    """A worker node is killed while it runs a benchmark; the exploration goes on without it.
    Runs last long enough that the node's worker sees its raylet die before the run ends."""
    from flexos.explore import explore

    os.environ["FLEXOS_REPLAY_SECONDS"] = "1.5"

    made = cluster([slot(), slot(), slot(), slot()])
    log = Path(os.environ["FLEXOS_REPLAY_LOG"])
    killed: dict[str, str] = {}

    def kill_one_running() -> None:
        workers = {node.node_id: node for node in made.worker_nodes}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            ended = {(e["node"], e["config"], e["repeat"]) for e in started if e["event"] == "end"}
            running = [
                e["node"]
                for e in started
                if e["event"] == "start" and (e["node"], e["config"], e["repeat"]) not in ended and e["node"] in workers
            ]
            if len(started) > 10 and running:
                made.remove_node(workers[running[0]], allow_graceful=False)
                killed["node"] = running[0]
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_running)
    killer.start()
    try:
        done = explore(REPLAY, budget, out=out / "explore", engine="ray", address=made.address)
        killer.join()
        results = json.loads((out / "explore" / "results.json").read_text())
        return {
            "stars": sorted(done.configs[i].name for i in done.answer.stars),
            "killed": killed.get("node"),
            "lost": results["lost"],
            "hosts": sorted(results["hosts"]),
            "foreign": foreign_sockets(),
        }
    finally:
        made.shutdown()


def scenario_sqlite(out: Path) -> dict[str, Any]:
    """examples/explore_sqlite through the CLI on two hosts, only one of which offers seccomp."""
    from flexos.explore.engines.ray import node_resources

    everything = node_resources()
    made = cluster([{"resources": everything}, slot()])
    try:
        head = made.head_node.node_id
        command = [str(FLEXOS), "explore", str(SQLITE), "--budget", "1", "--out", str(out / "explore")]
        done = subprocess.run(
            [*command, "--engine", "ray", "--address", made.address], capture_output=True, text=True, timeout=600
        )
        cache = [json.loads(line) for line in (out / "explore" / "cache.jsonl").read_text().splitlines()]
        return {
            "returncode": done.returncode,
            "stdout": done.stdout,
            "stderr": done.stderr[-3000:],
            "head": head,
            "head_has_seccomp": "flexos_feature_seccomp" in everything,
            "runs": [(e["configuration"], e["host"]) for e in cache if "value" in e],
            "foreign": foreign_sockets(),
        }
    finally:
        made.shutdown()


def scenario_own_ray(out: Path) -> dict[str, Any]:
    """--engine ray without --address: a Ray of its own on this machine, one host."""
    command = [
        str(FLEXOS),
        "explore",
        str(REPLAY),
        "--budget",
        "1e12",
        "--out",
        str(out / "explore"),
        "--engine",
        "ray",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "explore" / "results.json").read_text()) if done.returncode == 0 else {}
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:], "results": results}


def main() -> None:
    scenario, target = sys.argv[1], Path(sys.argv[2])
    if interfaces():
        raise SystemExit(f"refusing to start a Ray cluster in a namespace with interfaces besides lo: {interfaces()}")
    with tempfile.TemporaryDirectory(prefix="fxray") as scratch:
        os.environ["RAY_TMPDIR"] = scratch  # short: Ray's socket paths must fit in 107 bytes
        os.environ["FLEXOS_REPLAY_LOG"] = str(Path(scratch) / "replay.jsonl")
        os.environ.setdefault("FLEXOS_REPLAY_SECONDS", "0.05")
        out = Path(scratch)
        started = time.monotonic()
        foreign: list[str] = []
        stop = threading.Event()

        def watch() -> None:  # while the cluster runs, not only after it
            while not stop.wait(0.5):
                foreign.extend(foreign_sockets())

        watcher = threading.Thread(target=watch)
        watcher.start()
        if scenario == "stars":
            result = scenario_stars(out, [int(b) for b in sys.argv[3:]])
        elif scenario == "kill":
            result = scenario_kill(out, int(sys.argv[3]))
        elif scenario == "sqlite":
            result = scenario_sqlite(out)
        else:
            result = scenario_own_ray(out)
        stop.set()
        watcher.join()
        result["foreign"] = sorted(set(result.get("foreign", []) + foreign))
        log = Path(os.environ["FLEXOS_REPLAY_LOG"])
        result["replay_log"] = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        result["seconds"] = time.monotonic() - started
    target.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
