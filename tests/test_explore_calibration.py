"""Is the confidence ``flexos explore`` prints honest? Replays of FlexOS's Redis and Nginx spaces with noise.

Each replay draws every configuration's five runs again from FlexOS's five iterations (with
replacement), so the search meets noise and monotonicity violations it was not tuned on; the
unseen space also moves each configuration by its own factor (3% spread), as a second space of
the same shape would, and FlexOS's Nginx space is such a second space, measured (the search was
developed on the Redis data). Over each space's budgets (Redis 300k..1100k, Nginx 35k..135k) the
answers are compared with brute force:

- on the same data (what measuring all 80 in that replay would have found): the fraction that
  agree must be at least the confidence printed, and at least the inference confidence, per bin;
- on the true values (FlexOS's means, times the replay's factor): the printed confidence also
  covers the measurements' noise, so the same must hold there.

The unseen space is also explored on four hosts (batches of four), whose answers must be as honest;
and in a space where the order is wrong for one toggle (hardening uksched makes every
configuration 30% faster), a violation the search must learn from what it measures.

A bin passes when its accuracy is at least its mean confidence less two binomial standard errors.
The check is shown to fail for the confidence flexos printed before (the certificate's certainty
alone) on a rougher space (5% spread), and for one that always says 0.999.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest

from flexos.explore.order import documented_order, members, safety_facts
from flexos.explore.search import MOST_CONFIDENT_INFERENCE, Goal, search
from flexos.explore.space import load_space

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("replay_redis", ROOT / "bench" / "replay_redis.py")
replay = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(replay)

REPLAYS = 8
BUDGETS = replay.BUDGETS  # app -> the budgets explored
BINS = (0.0, 0.5, 0.8, 0.9, 0.95, 1.0)
SMALLEST_BIN = 10  # fewer answers than this in a bin say too little to judge


@dataclass(frozen=True)
class Outcome:
    confidence: float  # as printed
    inference_confidence: float
    measured_certainty: float  # the measured part alone (before: the certificate's, all flexos printed)
    same: bool  # the stars equal brute force on the replay's own data
    true: bool  # the stars equal brute force on the true values
    inferred_misses: int  # configurations inferred to miss the budget that are not below a star


def stars(order, goal: Goal, values: list[float]) -> list[int]:
    meeting = sum(1 << i for i, v in enumerate(values) if goal.meets(v))
    return [i for i in members(meeting) if not order.above[i] & meeting]


def replays(spread: float, seed: int, hosts: int, faster: str | None = None, app: str = "redis") -> list[Outcome]:
    space, _ = load_space(replay.space_file(app))
    configs = space.configurations()
    data = replay.load_data(replay.data_dir(app=app), app)
    runs = [data[replay.key_of(space.flexos_document(c))] for c in configs]
    facts = [safety_facts(c) for c in configs]
    order = documented_order(configs)
    rng = random.Random(seed)
    outcomes = []
    for _ in range(REPLAYS):
        factor = [math.exp(rng.gauss(0, spread)) for _ in runs]
        if faster:  # hardening this library makes every configuration faster: the order is wrong there
            factor = [
                f * (BROKEN if ("hardened", faster, "library", "H") in facts[i] else 1) for i, f in enumerate(factor)
            ]
        drawn = [[rng.choice(r) * f for _ in r] for r, f in zip(runs, factor, strict=True)]
        true = [statistics.fmean(r) * f for r, f in zip(runs, factor, strict=True)]
        for budget in BUDGETS[app]:
            goal = Goal(budget, higher_is_better=True, statistic="mean")
            answer = search(order, goal, facts, lambda i, drawn=drawn: drawn[i], batch=hosts)
            found = sorted(answer.stars)
            assert answer.confidence is not None
            outcomes.append(
                Outcome(
                    confidence=answer.confidence,
                    inference_confidence=answer.inference_confidence,
                    measured_certainty=answer.confidence / answer.inference_confidence,
                    same=found == stars(order, goal, [statistics.fmean(r) for r in drawn]),
                    true=found == stars(order, goal, true),
                    inferred_misses=sum(  # those that matter: not below a star
                        not meets and not any(order.below[star] >> i & 1 for star in answer.stars)
                        for i, meets in answer.inferred.items()
                    ),
                )
            )
    return outcomes


def miscalibrated(claims: list[tuple[float, bool]]) -> list[str]:
    """The bins (and the whole) whose accuracy falls short of their mean confidence by more than
    two binomial standard errors."""
    problems = []
    groups = [("all", claims)] + [
        (f"[{low}, {high})", [c for c in claims if low <= c[0] < high or (high == 1.0 and c[0] == 1.0)])
        for low, high in itertools.pairwise(BINS)
    ]
    for label, group in groups:
        if len(group) < SMALLEST_BIN:
            continue
        confidence = statistics.fmean(c for c, _ in group)
        accuracy = sum(right for _, right in group) / len(group)
        allowed = confidence - 2 * math.sqrt(confidence * (1 - confidence) / len(group))
        if accuracy < allowed:
            problems.append(f"{label}: {len(group)} answers, confidence {confidence:.3f}, right {accuracy:.3f}")
    return problems


# name -> spread of the factors, seed, hosts (configurations measured at once), the library whose
# hardening makes configurations faster, the app whose data it is
WORLDS = {
    "resampled": (0.0, 17, 1),
    "unseen": (0.03, 11, 1),
    "rough": (0.05, 3, 1),
    "unseen on 4 hosts": (0.03, 5, 4),
    "order broken": (0.02, 7, 1, "uksched"),
    "nginx resampled": (0.0, 23, 1, None, "nginx"),
    "nginx resampled on 4 hosts": (0.0, 29, 4, None, "nginx"),
}
BROKEN = 1.3


@pytest.fixture(scope="module")
def worlds() -> dict[str, list[Outcome]]:
    return {name: replays(*world) for name, world in WORLDS.items()}


@pytest.mark.parametrize(
    "world",
    ["resampled", "unseen", "unseen on 4 hosts", "order broken", "nginx resampled", "nginx resampled on 4 hosts"],
)
def test_confidence_is_calibrated(world: str, worlds: dict[str, list[Outcome]], capsys) -> None:
    outcomes = worlds[world]
    app = WORLDS[world][4] if len(WORLDS[world]) > 4 else "redis"
    assert len(outcomes) == REPLAYS * len(BUDGETS[app])
    assert not miscalibrated([(o.confidence, o.same) for o in outcomes])
    assert not miscalibrated([(o.inference_confidence, o.same) for o in outcomes])
    assert not miscalibrated([(o.confidence, o.true) for o in outcomes])
    with capsys.disabled():
        print(f"\n{world}: {summary(outcomes)}")


def test_inference_confidence_holds_on_a_rough_space(worlds: dict[str, list[Outcome]], capsys) -> None:
    """Each configuration 5% off FlexOS's values: inference is wrong more often, and says so."""
    outcomes = worlds["rough"]
    assert sum(not o.same for o in outcomes) >= 3
    assert not miscalibrated([(o.inference_confidence, o.same) for o in outcomes])
    assert not miscalibrated([(o.confidence, o.same) for o in outcomes])
    with capsys.disabled():
        print(f"\nrough: {summary(outcomes)}")


def test_the_check_fails_an_overconfident_report(worlds: dict[str, list[Outcome]]) -> None:
    assert miscalibrated([(o.measured_certainty, o.true) for o in worlds["rough"]])  # what flexos printed before
    assert miscalibrated([(MOST_CONFIDENT_INFERENCE, o.true) for o in worlds["unseen"]])


def test_an_answer_that_can_be_wrong_never_reads_certain(worlds: dict[str, list[Outcome]]) -> None:
    for outcome in [o for outcomes in worlds.values() for o in outcomes]:
        if outcome.inferred_misses:
            assert f"{outcome.confidence:.3f}" != "1.000"
            assert outcome.inference_confidence <= MOST_CONFIDENT_INFERENCE
        if not outcome.same:
            assert outcome.confidence < 0.99


def summary(outcomes: list[Outcome]) -> str:
    def mean(values) -> str:
        return f"{statistics.fmean(values):.3f}"

    return (
        f"{len(outcomes)} answers; equal to brute force on the same data {mean(o.same for o in outcomes)}, on the "
        f"true values {mean(o.true for o in outcomes)}; mean confidence {mean(o.confidence for o in outcomes)}, "
        f"inference confidence {mean(o.inference_confidence for o in outcomes)}"
    )
