"""The ray engine on a real local Ray cluster: several simulated nodes, one benchmark slot each.

The cluster runs inside namespaces this test makes (``unshare -Urn``, then ``ip link set lo up``;
and a PID namespace, so nothing outlives it): there Ray binds 127.0.0.1 for every component. This
file is also the program that runs in the namespace (``python tests/test_explore_ray.py OUT``): it
refuses to start where the namespace has an interface besides lo, starts one
``ray.cluster_utils.Cluster`` (a head offering every driver and feature this machine has, two
workers offering drivers only), runs every scenario on it, watches that no socket in the
namespace has an address outside loopback the whole time, and writes what it saw to OUT (JSON).
The tests judge that record; nothing reaches beyond loopback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import itertools
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPLAY = ROOT / "bench" / "replay_redis.yaml"
SQLITE = ROOT / "examples" / "explore_sqlite" / "space.yaml"
FLEXOS = Path(sys.executable).parent / "flexos"
BUDGETS = list(range(300_000, 1_100_001, 50_000))
BUDGET = 1_100_000  # of the interrupted exploration, resumed while a host dies
RESUME_BUDGET = 500_000
INTERRUPT_AFTER = 8  # runs ended before the exploration is interrupted
WORKERS = 2
# Faster than Ray's defaults, so a killed node is declared dead within seconds.
FAST_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}

# A user, network, mount and PID namespace: only lo, and everything Ray starts in it ends with its
# first process (the kernel kills the rest), even when the test times out.
UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount", "--pid", "--fork", "--mount-proc"]

# One cluster for the whole file: under pytest-xdist every test of it runs on one worker. Its
# scenarios run in the first test's setup, 4 minutes on a loaded 2-vCPU machine: the fixture's own
# limit (600 s, with the namespace's output) comes before pytest-timeout's.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster"), pytest.mark.timeout(660)]


# -- in the namespace -----------------------------------------------------------------------------------
def interfaces() -> list[str]:
    """The network interfaces of this namespace besides lo (/proc/net/dev is per namespace, /sys is not)."""
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return [name for name in (line.split(":")[0].strip() for line in lines) if name != "lo"]


def foreign_sockets() -> list[str]:
    """Sockets in this namespace with an address outside loopback (listening on a wildcard counts)."""
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
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
    address = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return address.ipv4_mapped or address


def descendants(pid: int) -> list[int]:
    """The processes ``pid`` started, and the ones they started, ... (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def replay_log() -> list[dict[str, Any]]:
    """The replay benchmark's record of every run: node, configuration, repeat, start and end."""
    log = Path(os.environ["FLEXOS_REPLAY_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def scenario_stars(address: str, out: Path) -> dict[str, Any]:
    """Every budget on the replayed Redis space through one engine and one cache, as a user sweeping
    budgets would (explore's own measuring loop, without writing a report per budget): each
    budget's stars, measurements and batches."""
    from flexos.explore import explore, load_space, make_engine, settle
    from flexos.explore.order import documented_order, safety_facts
    from flexos.explore.runner import Runner, bench_of
    from flexos.explore.search import Goal, Search

    space, _ = load_space(REPLAY)
    configs = space.configurations()
    order, facts = documented_order(configs), [safety_facts(c) for c in configs]
    engine = make_engine("ray", bench_of(space, out), address)
    runner = Runner(space, configs, out, engine)
    answers = {}
    try:
        for budget in BUDGETS:
            answer = settle(Search(order, Goal(budget, statistic=space.benchmark.statistic), facts), runner)
            answers[budget] = {
                "stars": sorted(configs[i].name for i in answer.stars),
                "measured": len(answer.measured),
                "batches": answer.batches,
            }
    finally:
        engine.close()
    # The cluster's cache, resumed here: every run the local engine's search asks for is in it.
    done = explore(REPLAY, RESUME_BUDGET, out=out, engine="local")
    resumed = {
        "runs": done.runs,
        "stars": sorted(configs[i].name for i in done.answer.stars),
        "results": json.loads((out / "results.json").read_text()),
    }
    return {"answers": answers, "hosts": sorted(runner.hosts), "log": replay_log(), "resumed": resumed}


def slow_replay(directory: Path, extra: str = "") -> Path:
    """The replay space with runs of 0.3 s (so runs are seen running), in ``directory``; ``extra``
    is added to its explore section."""
    space = directory / "replay_redis.yaml"
    directory.mkdir(parents=True)
    replay = ROOT / "bench" / "replay_redis.py"
    command = f"FLEXOS_REPLAY_SECONDS=0.3 python {replay}"
    text = REPLAY.read_text().replace("command: python replay_redis.py", f"command: {command}")
    space.write_text(text.replace("  benchmark:", f"{extra}  benchmark:"))
    return space


def scenario_sqlite(address: str, out: Path) -> dict[str, Any]:
    """examples/explore_sqlite through the CLI: only the head offers seccomp."""
    command = [str(FLEXOS), "explore", str(SQLITE), "--budget", "1", "--out", str(out)]
    done = subprocess.run([*command, "--engine", "ray", "--address", address], capture_output=True, text=True)
    cache = (out / "cache.jsonl").read_text().splitlines() if done.returncode == 0 else []
    return {
        "returncode": done.returncode,
        "stdout": done.stdout,
        "stderr": done.stderr[-3000:],
        "runs": [(e["configuration"], e["host"]) for e in map(json.loads, cache) if "value" in e],
    }


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def on_a_terminal(command: list[str], stop_when: Callable[[], bool]) -> tuple[int, str]:
    """Run ``command`` with stderr on a terminal (a pty), sending it SIGINT (Ctrl-C) once
    ``stop_when()`` holds; its return code and what the terminal showed."""
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=secondary,
        stdin=subprocess.DEVNULL,
        # Ctrl-C works as on a terminal even where the suite runs with SIGINT ignored (a background
        # job), which its children would inherit, and Python would then not install its handler.
        preexec_fn=_default_sigint,
    )
    os.close(secondary)
    shown: list[bytes] = []

    def drain() -> None:  # until the process closes the terminal
        with contextlib.suppress(OSError):
            while chunk := os.read(primary, 4096):
                shown.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if stop_when():
            process.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    process.wait(timeout=120)
    reader.join(timeout=30)
    os.close(primary)
    return process.returncode, b"".join(shown).decode(errors="replace")[-20000:]


def scenario_interrupt_and_kill(cluster: Any, out: Path) -> dict[str, Any]:
    """A cluster exploration is interrupted (Ctrl-C, its stderr a terminal where the progress bar
    shows), then run again on the cluster, named this time by the space file's ``engine:`` and
    ``address:`` keys; while it runs a worker node is killed mid-run, and the exploration goes on
    without it. The space is the replay's with runs of 0.3 s, so runs are seen running; the node
    dies with every process it ran (its workers and their benchmark), as a host does."""
    flagged = slow_replay(out / "flags")
    keyed = slow_replay(out / "keys", f"  engine: ray\n  address: {cluster.address}\n")
    results = out / "explore"
    before = len(replay_log())
    command = [str(FLEXOS), "explore", str(flagged), "--budget", str(BUDGET), "--out", str(results)]

    def runs_ended() -> int:  # by the benchmark's own record
        try:
            return sum(e["event"] == "end" for e in replay_log()[before:])
        except json.JSONDecodeError:  # a line being written
            return 0

    interrupted, terminal = on_a_terminal(
        [*command, "--engine", "ray", "--address", cluster.address], lambda: runs_ended() >= INTERRUPT_AFTER
    )
    cached = [json.loads(line) for line in (results / "cache.jsonl").read_text().splitlines()]
    middle = len(replay_log())
    workers = {node.node_id: node for node in cluster.worker_nodes}
    killed: dict[str, str] = {}

    def kill_one_running() -> None:
        """Kill a worker node that has finished a run of the resumed exploration and is running another."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not finished.is_set():
            log = replay_log()[middle:]
            ended = {(e["node"], e["config"], e["repeat"]) for e in log if e["event"] == "end"}
            running = [
                e["node"]
                for e in log
                if e["event"] == "start" and (e["node"], e["config"], e["repeat"]) not in ended and e["node"] in workers
            ]
            done_some = {node for node, _, _ in ended}
            victim = next((node for node in running if node in done_some), None)
            if victim is not None:  # the host dies: its Ray node and every process it ran
                node = workers[victim]
                raylet = node.all_processes["raylet"][0].process.pid
                processes = descendants(raylet)
                cluster.remove_node(node, allow_graceful=False)
                for pid in processes:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                killed["node"] = victim
                return
            time.sleep(0.05)

    finished = threading.Event()
    killer = threading.Thread(target=kill_one_running)
    killer.start()
    try:  # no --engine, no --address: the space file's keys say where
        done = subprocess.run(
            [str(FLEXOS), "explore", str(keyed), "--budget", str(BUDGET), "--out", str(results)],
            capture_output=True,
            text=True,
        )
    finally:
        finished.set()
        killer.join()
    summary = json.loads((results / "results.json").read_text()) if done.returncode == 0 else {}
    return {
        "interrupted": interrupted,
        "terminal": terminal,
        "cached": [(e["configuration"], e["run"]) for e in cached if "value" in e],
        "returncode": done.returncode,
        "stdout": done.stdout,
        "stderr": done.stderr[-3000:],
        "results": summary,
        "stars": sorted(summary.get("stars", [])),
        "killed": killed.get("node"),
        "lost": summary.get("lost"),
        "hosts": sorted(summary.get("hosts", [])),
        "log": replay_log()[before:],
        "resumed_log": replay_log()[middle:],
    }


def scenario_own_ray(out: Path) -> dict[str, Any]:
    """--engine ray without --address: a Ray of its own on this machine, one host (beside the
    cluster, which it must not join; its runs log elsewhere)."""
    command = [str(FLEXOS), "explore", str(REPLAY), "--budget", "1e12", "--out", str(out), "--engine", "ray"]
    env = {**os.environ, "FLEXOS_REPLAY_LOG": str(out.parent / "own-replay.jsonl")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    results = json.loads((out / "results.json").read_text()) if done.returncode == 0 else {}
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:], "results": results}


def in_namespace(target: Path) -> None:
    """Start the cluster, run the scenarios on it, write what they found to ``target``."""
    from ray.cluster_utils import Cluster

    from flexos.explore.engines.ray import DRIVER, SLOT, node_resources

    if interfaces():
        raise SystemExit(f"refusing to start a Ray cluster in a namespace with interfaces besides lo: {interfaces()}")
    found: dict[str, Any] = {"seconds": {}, "foreign": []}
    stop = threading.Event()

    def watch() -> None:  # while the cluster runs, not only after it
        while not stop.wait(0.5):
            found["foreign"].extend(foreign_sockets())

    def timed(name: str, scenario: Callable[[], dict[str, Any]]) -> None:
        started = time.monotonic()
        found[name] = scenario()
        found["seconds"][name] = time.monotonic() - started
        print(f"{name}: {found['seconds'][name]:.1f} s", file=sys.stderr, flush=True)

    threading.Thread(target=watch, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory(prefix="fxray") as scratch:
            os.environ["RAY_TMPDIR"] = scratch  # short: Ray's socket paths must fit in 107 bytes
            os.environ["FLEXOS_REPLAY_LOG"] = str(Path(scratch) / "replay.jsonl")  # inherited by every node
            out = Path(scratch) / "out"
            cluster: Any = None

            def start() -> dict[str, Any]:
                nonlocal cluster
                everything = node_resources()
                drivers_only = {r: n for r, n in everything.items() if r == SLOT or r.startswith(DRIVER)}
                loopback = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
                head = {**loopback, "include_dashboard": False, "_system_config": FAST_FAILURE, "resources": everything}
                cluster = Cluster(initialize_head=True, head_node_args=head)
                for _ in range(WORKERS):
                    cluster.add_node(**loopback, resources=drivers_only)
                cluster.wait_for_nodes()
                return {"head": cluster.head_node.node_id, "resources": everything}

            # A Ray of its own starts (mostly waiting) while the cluster's first scenario runs.
            own = threading.Thread(target=timed, args=("own_ray", lambda: scenario_own_ray(out / "own")))
            try:
                timed("cluster", start)
                own.start()
                timed("stars", lambda: scenario_stars(cluster.address, out / "stars"))
                timed("sqlite", lambda: scenario_sqlite(cluster.address, out / "sqlite"))
                # last: it takes a host away
                timed("interrupt_and_kill", lambda: scenario_interrupt_and_kill(cluster, out / "kill"))
            finally:
                if own.ident is not None:
                    own.join()
                if cluster is not None:
                    cluster.shutdown()
    finally:
        stop.set()
    found["foreign"] = sorted(set(found["foreign"] + foreign_sockets()))
    target.write_text(json.dumps(found))


# -- the tests -------------------------------------------------------------------------------------
def _namespace_problem() -> str | None:
    """Why a Ray cluster cannot be run in a namespace of its own here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'flexos[cluster]'; scripts/setup does)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is missing (util-linux, iproute2)"
    probe = subprocess.run([*UNSHARE, "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What every scenario found on the cluster in its namespace (run once for this module)."""
    problem = _namespace_problem()
    if problem:
        print(f"skipped: {problem}")
        pytest.skip(problem)
    target = tmp_path_factory.mktemp("ray") / "found.json"
    done = subprocess.run(
        [*UNSHARE, "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, __file__, str(target)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-5000:]
    found = json.loads(target.read_text())
    print("ray scenarios, seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in found["seconds"].items()))
    return found


def sequential_stars() -> dict[int, list[str]]:
    """The local engine's answer at each budget: the search one configuration at a time on the
    values the replay benchmark prints (test_explore_redis.py shows they are FlexOS's)."""
    from flexos.explore.order import documented_order, safety_facts
    from flexos.explore.search import Goal, search
    from flexos.explore.space import load_space

    spec = importlib.util.spec_from_file_location("replay_redis", ROOT / "bench" / "replay_redis.py")
    assert spec is not None and spec.loader is not None
    replay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay)
    space, _ = load_space(REPLAY)
    configs = space.configurations()
    data = replay.load_data(replay.data_dir())
    runs = [data[replay.key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    order = documented_order(configs)
    stars = {}
    for budget in BUDGETS:
        answer = search(order, Goal(budget, statistic="mean"), facts, runs.__getitem__)
        stars[budget] = sorted(configs[i].name for i in answer.stars)
    return stars


def spans_by_node(log: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    spans = defaultdict(list)
    for entry in log:
        if entry["event"] == "end":
            spans[entry["node"]].append((entry["start"], entry["end"]))
    return spans


def assert_one_run_per_host(log: list[dict[str, Any]]) -> None:
    """No two runs overlapped on one host; runs did overlap on different hosts (it was parallel)."""
    spans = spans_by_node(log)
    assert len(spans) >= 2
    for node, times in spans.items():
        times.sort()
        for (_, end), (start, _) in itertools.pairwise(times):
            assert start >= end, f"two runs at once on {node}"
    every = sorted(span for times in spans.values() for span in times)
    assert any(start < end for (_, end), (start, _) in itertools.pairwise(every))


def test_every_cluster_socket_is_on_loopback(cluster: dict[str, Any]) -> None:
    assert cluster["foreign"] == []


def test_ray_engine_gives_the_local_engines_stars(cluster: dict[str, Any]) -> None:
    found = cluster["stars"]
    expected = sequential_stars()
    for budget in BUDGETS:
        answer = found["answers"][str(budget)]
        assert answer["stars"] == expected[budget], budget
        assert answer["batches"] < answer["measured"], budget  # three hosts measured at once
    assert len(found["hosts"]) == WORKERS + 1


def test_a_cluster_exploration_resumes_locally(cluster: dict[str, Any]) -> None:
    """The same cache.jsonl: the local engine finds every run it needs there, with the host that ran it."""
    resumed = cluster["stars"]["resumed"]
    assert resumed["runs"] == 0
    assert resumed["stars"] == sequential_stars()[RESUME_BUDGET]
    hosts = resumed["results"]["hosts"]
    assert sorted(hosts) == cluster["stars"]["hosts"]
    for host in hosts.values():
        assert {"hostname", "cpu", "kernel", "python", "flexos", "features", "drivers"} <= set(host)
        assert "process" in host["drivers"] and "seccomp" in host["features"]
    for record in resumed["results"]["results"]:
        if record["status"] == "measured":
            assert len(record["hosts"]) == 5 and set(record["hosts"]) <= set(hosts)


def test_never_two_runs_on_one_host(cluster: dict[str, Any]) -> None:
    assert_one_run_per_host(cluster["stars"]["log"])
    assert_one_run_per_host(cluster["interrupt_and_kill"]["log"])


def test_a_host_dying_mid_run_loses_only_its_run(cluster: dict[str, Any]) -> None:
    found = cluster["interrupt_and_kill"]
    assert found["returncode"] == 0, found["stderr"]
    print(f"lost with the killed host: {found['lost']}")
    assert found["stars"] == sequential_stars()[BUDGET]
    assert f"lost {len(found['lost'])} runs with their host, run again elsewhere" in found["stdout"]
    results = found["results"]
    assert results["batches"] < results["measured"]  # three, then two hosts: the report compares with one
    one_host = f"{'' if results['sequential_exact'] else 'at least '}{results['sequential_measured']}"
    assert (
        f"in {results['batches']} batches, one configuration per host at a time; one host would have measured "
        f"{one_host}, one per batch"
    ) in found["stdout"]
    assert found["killed"], "no worker node was seen running a benchmark"
    assert found["lost"], "the killed node's run was not recorded as lost"
    assert found["killed"] in found["hosts"]  # it ran runs before it died
    ended = [e for e in found["resumed_log"] if e["event"] == "end"]
    for lost in found["lost"]:  # run again, elsewhere
        assert any(e["config"] == lost["configuration"] and e["node"] != found["killed"] for e in ended), lost
    assert len({e["node"] for e in ended} - {found["killed"]}) == WORKERS  # the others went on
    hosts = results["hosts"]  # each host as the report shows it: here all of one kind
    host = next(iter(hosts.values()))
    assert f"on {len(hosts)} hosts: {len(hosts)} x {host['cpu']}, kernel {host['kernel']}, Python" in found["stdout"]


def test_runs_happen_in_the_shipped_working_dir(cluster: dict[str, Any]) -> None:
    """The benchmark's directory reaches the hosts as Ray's runtime environment (``working_dir``):
    each run's directory is Ray's unpacked copy, not bench/; the generated flexos.yaml is written on
    the host, where FLEXOS_CONFIG names it."""
    log = [e for e in cluster["stars"]["log"] if e["event"] == "end"]
    assert log
    for entry in log:
        assert "runtime_resources" in entry["cwd"] and Path(entry["cwd"]) != ROOT / "bench", entry
        assert (Path(entry["cwd"]) / "replay_redis.py").name == "replay_redis.py"
        config = Path(entry["config_path"])
        assert config.parent.name.startswith("flexos-explore-") and config.stem == entry["config"], entry


def test_an_interrupted_cluster_exploration_resumes_on_the_cluster(cluster: dict[str, Any]) -> None:
    """Ctrl-C mid-run: the runs done so far are in cache.jsonl; run again on the cluster (named by
    the space file's engine and address keys this time) it runs only what is missing. Its stderr
    was a terminal: the progress bar showed configurations settled and hosts busy."""
    found = cluster["interrupt_and_kill"]
    terminal = found["terminal"]
    assert found["interrupted"] == 130, terminal[-3000:]
    assert "flexos explore: interrupted." in terminal and "runs are cached in" in terminal
    assert re.search(r"\b\d+/80 \[[^\]]*, [1-3]/3 hosts busy", terminal), terminal[-3000:]
    assert found["returncode"] == 0, found["stderr"]
    results = found["results"]
    measured = {r["name"] for r in results["results"] if r["status"] == "measured"}
    cached = {(name, run) for name, run in found["cached"] if name in measured}
    assert cached, "nothing the search needed was cached before the interruption"
    assert len(found["cached"]) < 5 * len(measured)  # it was stopped before the end
    assert f"benchmark runs: {5 * len(measured) - len(cached)} now" in found["stdout"]  # nothing cached ran again
    resumed = {(e["config"], int(e["repeat"])) for e in found["resumed_log"] if e["event"] == "start"}
    assert not cached & resumed
    assert set(results["hosts"]) >= set(found["hosts"]) and len(results["hosts"]) == WORKERS + 1  # on the cluster


def test_sqlite_example_on_a_cluster(cluster: dict[str, Any]) -> None:
    """examples/explore_sqlite end to end with --engine ray: every configuration with the Seccomp
    toggle runs on the head, the only host that offers seccomp."""
    found = cluster["sqlite"]
    assert found["returncode"] == 0, found["stderr"]
    assert "* Q1Audit_pEnvSeccomp " in found["stdout"]
    assert "flexos_feature_seccomp" in cluster["cluster"]["resources"]
    assert {host for _, host in found["runs"]} - {cluster["cluster"]["head"]}  # workers ran runs too
    for configuration, host in found["runs"]:
        if "Seccomp" in configuration:
            assert host == cluster["cluster"]["head"], configuration


def test_ray_without_an_address_starts_its_own(cluster: dict[str, Any]) -> None:
    found = cluster["own_ray"]
    assert found["returncode"] == 0, found["stderr"]
    assert "no configuration meets it" in found["stdout"]
    results = found["results"]
    assert results["measured"] == 1 and len(results["hosts"]) == 1
    assert [r["hosts"] for r in results["results"] if r["status"] == "measured"] == [[*results["hosts"]] * 5]


if __name__ == "__main__":
    in_namespace(Path(sys.argv[1]))
