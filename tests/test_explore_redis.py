"""flexos explore on FlexOS's own measured Redis space (ASPLOS'22 figures 6 and 8), replayed.

Every configuration's "measurement" is FlexOS's: bench/replay_redis.py maps a generated flexos.yaml
to its row of redis-perm.csv and answers with redis-res.csv's GET throughput (CHUNK 5), one
iteration per run, so the mean of five runs is what FlexOS plotted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexos.config import parse
from flexos.explore.order import documented_order, read_order, safety_facts
from flexos.explore.runner import Runner
from flexos.explore.search import Goal, search
from flexos.explore.space import load_space

ROOT = Path(__file__).resolve().parent.parent
FLEXOS = Path(sys.executable).parent / "flexos"
_spec = importlib.util.spec_from_file_location("replay_redis", ROOT / "bench" / "replay_redis.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)
DATA = replay.data_dir()  # bench/data/flexos-asplos22-redis, FlexOS's own measurements

# FlexOS's stars in its figure 8 (budget 500k req/s), in its own compartment numbering.
FLEXOS_STARS = ["R1HN1S1HL1H", "R1HN1S1HL2H", "R1N1S2HL1H", "R1N1S2HL3H", "R2N2S1HL1H"]
GOAL_FRACTION = 0.25
# FlexOS's hand-drawn order compares fewer configurations, so it infers less.
POSET_FRACTION = 0.35


@pytest.fixture(scope="module")
def redis():
    space, _ = load_space(replay.SPACE)
    configs = space.configurations()
    data = replay.load_data(DATA)
    runs = [data[replay.key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    orders = {"documented": documented_order(configs), "poset.dot": read_order(DATA / "poset.dot", space, configs)}
    return space, configs, runs, facts, orders


def brute_force(order, goal, facts, runs):
    return search(order, goal, facts, lambda i: runs[i], exhaustive=True)


def test_the_space_is_flexos_80_configurations(redis, tmp_path: Path) -> None:
    space, configs, runs, _, orders = redis
    assert len(configs) == 80
    assert len({id(r) for r in runs}) == 80  # each configuration is its own row of the data
    assert all(len(r) == 5 for r in runs)  # FlexOS's five iterations
    assert not orders["poset.dot"].notes  # poset.dot names all 80
    assert orders["poset.dot"].graph().number_of_edges() == 166
    runner = Runner(space, configs, tmp_path)
    for index in (0, 41, 79):
        parse(runner.config_path(index))  # generated configurations are valid flexos.yaml


def test_poset_dot_order_gives_flexos_five_stars(redis, capsys: pytest.CaptureFixture[str]) -> None:
    space, configs, runs, facts, orders = redis
    goal = Goal(500_000, higher_is_better=True, statistic="mean")
    answer = search(orders["poset.dot"], goal, facts, lambda i: runs[i])
    stars = sorted(configs[i].name for i in answer.stars)
    assert stars == sorted(space.canonical_name(n) for n in FLEXOS_STARS)
    assert sorted(answer.stars) == sorted(brute_force(orders["poset.dot"], goal, facts, runs).stars)
    assert len(answer.certificate) == 13  # the five stars and eight first misses
    fraction = len(answer.measured) / len(configs)
    with capsys.disabled():
        print(
            f"\nposet.dot order, 500k req/s: measured {len(answer.measured)}/80 = {fraction:.1%}, confidence "
            f"{answer.confidence:.3f}"
        )
    # FlexOS's five stars have eight safer neighbours in its poset, each measured to verify them.
    assert fraction <= POSET_FRACTION


def test_documented_order_equals_brute_force(redis, capsys: pytest.CaptureFixture[str]) -> None:
    _, configs, runs, facts, orders = redis
    fractions = {}
    for budget in range(300_000, 1_100_001, 50_000):
        goal = Goal(budget, higher_is_better=True, statistic="mean")
        answer = search(orders["documented"], goal, facts, lambda i: runs[i])
        assert sorted(answer.stars) == sorted(brute_force(orders["documented"], goal, facts, runs).stars), budget
        assert set(answer.measured) | set(answer.inferred) == set(range(80))
        fractions[budget] = len(answer.measured) / len(configs)
    with capsys.disabled():
        print(
            "\ndocumented order, measured fraction per budget (k req/s): "
            + ", ".join(f"{b // 1000}k {f:.0%}" for b, f in fractions.items())
        )
    assert fractions[500_000] <= GOAL_FRACTION
    certificate = search(orders["documented"], Goal(500_000, statistic="mean"), facts, lambda i: runs[i]).certificate
    assert len(certificate) == 5  # two stars and three first misses


def test_flexos_data_breaks_monotonicity_as_measured(redis) -> None:
    _, _, runs, facts, orders = redis
    goal = Goal(500_000, statistic="mean")
    drawn = brute_force(orders["poset.dot"], goal, facts, runs)
    assert (drawn.edge_violations, drawn.edges_compared) == (7, 166)
    product = brute_force(orders["documented"], goal, facts, runs)
    assert (len(product.violations), product.compared) == (22, 892)


def test_suspected_neighbours_of_stars_are_measured(redis) -> None:
    _, _, runs, facts, orders = redis
    order = orders["documented"]
    answer = search(order, Goal(370_000, statistic="mean"), facts, lambda i: runs[i])
    assert answer.verified  # the model thought a neighbour of a star might meet the budget after all
    for index in answer.verified:
        assert index in answer.measured
        assert any(index in order.covers(star) for star in answer.stars)


def test_replay_benchmark_contract(redis, tmp_path: Path) -> None:
    space, configs, runs, _, _ = redis
    runner = Runner(space, configs, tmp_path)
    index = next(i for i, c in enumerate(configs) if c.name == "R1HN1S1HL2H")
    env = {**os.environ, "FLEXOS_CONFIG": str(runner.config_path(index)), "FLEXOS_REPEAT": "7"}
    command = [sys.executable, str(ROOT / "bench" / "replay_redis.py")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.splitlines()[-1]) == pytest.approx(runs[index][7 % 5], abs=0.01)
    env["FLEXOS_CONFIG"] = str(tmp_path / "other.yaml")
    (tmp_path / "other.yaml").write_text("compartments: []\nlibraries: {redis: {compartment: a}}\n")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "places no newlib, uksched, lwip; use bench/replay_redis.yaml" in done.stderr


@pytest.mark.slow
def test_flexos_explore_command_on_the_replay(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(FLEXOS),
            "explore",
            str(replay.SPACE),
            "--budget",
            "500000",
            "--order",
            str(DATA / "poset.dot"),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    space, _ = load_space(replay.SPACE)
    assert sorted(results["stars"]) == sorted(space.canonical_name(n) for n in FLEXOS_STARS)
    assert results["measured_fraction"] <= POSET_FRACTION
    assert f"measured {results['measured']} of 80 configurations ({results['measured_fraction']:.1%})" in done.stdout
    for name in results["stars"]:
        assert f"* {name} " in done.stdout
    assert (tmp_path / "poset.svg").read_text().startswith("<?xml")
    assert (tmp_path / "performance.svg").exists()
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 81 and rows[0].startswith("name,layout,status,meets_budget,star,value,runs")
