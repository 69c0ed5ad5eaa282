"""The ray engine on a real local Ray cluster (several simulated nodes, one benchmark slot each).

Every cluster runs inside a network namespace this test makes (``unshare -Urn``, then ``ip link set
lo up``): there Ray binds 127.0.0.1 for every component, and tests/explore_ray_cluster.py checks
that no socket in the namespace has another address. Nothing here reaches beyond loopback.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from flexos.explore.order import documented_order, safety_facts
from flexos.explore.search import Goal, search
from flexos.explore.space import load_space

ROOT = Path(__file__).resolve().parent.parent
HELPER = Path(__file__).resolve().parent / "explore_ray_cluster.py"
_spec = importlib.util.spec_from_file_location("replay_redis", ROOT / "bench" / "replay_redis.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)

CI_BUDGETS = [300_000, 500_000, 1_100_000]
ALL_BUDGETS = list(range(300_000, 1_100_001, 50_000))

pytestmark = pytest.mark.slow


def _namespace_problem() -> str | None:
    """Why a Ray cluster cannot be run in a namespace of its own here (None: it can)."""
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'flexos[cluster]'; scripts/setup does)"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "unshare or ip is missing (util-linux, iproute2)"
    probe = subprocess.run(
        ["unshare", "-Urn", "sh", "-c", "ip link set lo up && cat /proc/net/dev"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace: {probe.stderr.strip() or probe.returncode}"
    return None


PROBLEM = _namespace_problem()


def in_namespace(tmp_path: Path, scenario: str, *args: str) -> dict[str, Any]:
    """Run a scenario of the helper in a new user and network namespace with only lo; its findings."""
    if PROBLEM:
        print(f"skipped: {PROBLEM}")
        pytest.skip(PROBLEM)
    out = tmp_path / f"{scenario}.json"
    command = [sys.executable, str(HELPER), scenario, str(out), *args]
    done = subprocess.run(
        ["unshare", "-Urn", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-5000:]
    found = json.loads(out.read_text())
    assert found["foreign"] == [], found["foreign"]  # every socket of the cluster is on loopback
    print(f"{scenario}: {found['seconds']:.1f} s")
    return found


def sequential_stars(budgets: list[int]) -> dict[int, list[str]]:
    """The local engine's answer: the sequential search on the replayed runs (the values the
    replay benchmark prints, test_explore_redis.py shows)."""
    space, _ = load_space(replay.SPACE)
    configs = space.configurations()
    data = replay.load_data(replay.data_dir())
    runs = [data[replay.key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    order = documented_order(configs)
    stars = {}
    for budget in budgets:
        answer = search(order, Goal(budget, statistic="mean"), facts, lambda i: runs[i])
        stars[budget] = sorted(configs[i].name for i in answer.stars)
    return stars


def assert_one_run_per_host(log: list[dict[str, Any]]) -> None:
    """No two runs overlapped on one host; runs did overlap on different hosts (it was parallel)."""
    by_node = defaultdict(list)
    for entry in log:
        if entry["event"] == "end":
            by_node[entry["node"]].append((entry["start"], entry["end"]))
    assert len(by_node) >= 2
    for node, spans in by_node.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two runs at once on {node}"
    every = sorted(span for spans in by_node.values() for span in spans)
    assert any(start < end for (_, end), (start, _) in itertools.pairwise(every))


def check_stars(found: dict[str, Any], budgets: list[int]) -> None:
    expected = sequential_stars(budgets)
    for budget in budgets:
        answer = found["answers"][str(budget)]
        assert answer["stars"] == expected[budget], budget
        assert answer["batches"] < answer["measured"] or answer["measured"] <= 1
    assert found["hosts"] == 3
    assert_one_run_per_host(found["replay_log"])


def test_ray_engine_gives_the_local_engines_stars(tmp_path: Path) -> None:
    found = in_namespace(tmp_path, "stars", *map(str, CI_BUDGETS))
    check_stars(found, CI_BUDGETS)


@pytest.mark.skipif(
    not os.environ.get("FLEXOS_RAY_ALL_BUDGETS"),
    reason="all 17 budgets take two minutes more: set FLEXOS_RAY_ALL_BUDGETS=1",
)
def test_ray_engine_gives_the_local_engines_stars_at_every_budget(tmp_path: Path) -> None:
    found = in_namespace(tmp_path, "stars", *map(str, ALL_BUDGETS))
    check_stars(found, ALL_BUDGETS)


def test_a_host_dying_mid_run_loses_only_its_run(tmp_path: Path) -> None:
    found = in_namespace(tmp_path, "kill", "1100000")
    assert found["stars"] == sequential_stars([1_100_000])[1_100_000]
    assert found["killed"], "no worker node was seen running a benchmark"
    assert found["lost"], "the killed node's run was not recorded as lost"
    assert found["killed"] in found["hosts"]  # it ran runs before it died
    ended = [e for e in found["replay_log"] if e["event"] == "end"]
    for lost in found["lost"]:  # run again, elsewhere
        assert any(e["config"] == lost["configuration"] and e["node"] != found["killed"] for e in ended), lost
    assert len({e["node"] for e in ended} - {found["killed"]}) >= 3  # the others went on


def test_sqlite_example_on_a_cluster(tmp_path: Path) -> None:
    """examples/explore_sqlite end to end with --engine ray: two hosts, only one offers seccomp, so
    every configuration with the Seccomp toggle runs there."""
    found = in_namespace(tmp_path, "sqlite")
    assert found["returncode"] == 0, found["stderr"]
    assert "* Q1Audit_pEnvSeccomp " in found["stdout"]
    assert found["head_has_seccomp"]
    assert found["runs"]
    for configuration, host in found["runs"]:
        if "Seccomp" in configuration:
            assert host == found["head"], configuration


def test_ray_without_an_address_starts_its_own(tmp_path: Path) -> None:
    found = in_namespace(tmp_path, "own-ray")
    assert found["returncode"] == 0, found["stderr"]
    assert "no configuration meets it" in found["stdout"]
    results = found["results"]
    assert results["measured"] == 1 and len(results["hosts"]) == 1
    assert [r["hosts"] for r in results["results"] if r["status"] == "measured"] == [[*results["hosts"]] * 5]
