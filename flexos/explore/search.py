"""The monotone search: the safest configurations that meet a budget, measuring as few as it can.

Pure (no IO): :class:`Search` says which configuration to measure next and is told the results;
:func:`search` drives it with an oracle. Assumption: safer is never faster, so a configuration
below one that meets the budget meets it, and one above a configuration that misses it misses it.

- Noise: each measurement is several runs; its *certainty* is the probability that the true
  value lies on the measured side of the budget (normal approximation). Only decisive
  measurements (certainty >= ``decisive``) are used to infer others; the rest stand for
  themselves, so the configurations around them get measured too.
- Choice: a performance model (each safety fact adds a non-negative cost per unit of work,
  fitted by least squares to what was measured) predicts the unknown configurations. The search
  measures the predicted boundary: predicted stars and predicted first misses, which are what a
  certificate of the answer consists of, the one expected to settle the most unknowns first.
- Verification: a configuration immediately above a star that was only inferred to miss the
  budget, but that the model predicts might meet it, is measured too (monotonicity may not hold).
- Failures: a configuration whose benchmark cannot run is settled as failed. It says nothing about
  its neighbours (a C extension that refuses a subinterpreter runs in a safer process), so nothing
  is inferred from it, and it is never a star.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from flexos.explore.order import SafetyOrder, members

# A measurement this sure of its side of the budget is used to infer other configurations.
DECISIVE = 0.95
# Ridge penalty of the performance model: defines the fit with fewer measurements than facts.
RIDGE = 0.1
# Standard error of the median relative to that of the mean, for normally distributed runs.
_MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)


@dataclass(frozen=True)
class Goal:
    budget: float
    higher_is_better: bool = True
    statistic: str = "median"  # how the runs of one configuration become its value: median or mean

    def meets(self, value: float) -> bool:
        return value >= self.budget if self.higher_is_better else value <= self.budget


@dataclass(frozen=True)
class Measurement:
    values: tuple[float, ...]  # one per run
    value: float  # their median or mean
    meets: bool
    certainty: float | None  # P(the true value is on the measured side of the budget); None for one run

    @classmethod
    def of(cls, values: Sequence[float], goal: Goal) -> Measurement:
        values = tuple(float(v) for v in values)
        center = statistics.median(values) if goal.statistic == "median" else statistics.fmean(values)
        meets = goal.meets(center)
        certainty = None
        if len(values) > 1:
            spread = statistics.stdev(values) / math.sqrt(len(values))
            if goal.statistic == "median":
                spread *= _MEDIAN_EFFICIENCY
            if spread == 0:
                certainty = 1.0 if center != goal.budget else 0.5
            else:
                above = 1 - NormalDist(center, spread).cdf(goal.budget)
                certainty = above if meets == goal.higher_is_better else 1 - above
        return cls(values, center, meets, certainty)

    @property
    def decisive(self) -> bool:
        return self.certainty is None or self.certainty >= DECISIVE


@dataclass(frozen=True)
class Answer:
    stars: tuple[int, ...]  # the safest configurations that meet the budget
    measured: dict[int, Measurement]  # in the order they were measured
    inferred: dict[int, bool]  # configuration -> meets the budget, by monotonicity
    verified: tuple[int, ...]  # configurations measured to verify a star's neighbours
    failed: dict[int, str]  # configuration -> why its benchmark could not run
    certificate: tuple[int, ...]  # the measurements the answer rests on: stars and first misses
    confidence: float | None  # P(every certificate measurement is on its side of the budget)
    violations: tuple[tuple[int, int], ...]  # measured (less safe, safer) pairs where the safer did better
    compared: int  # measured pairs the order compares
    edge_violations: int  # violations between a configuration and one immediately safer
    edges_compared: int
    exhaustive: bool


class Search:
    """The search as a state machine: ``next()`` names a configuration to measure, ``record()`` takes its runs."""

    def __init__(
        self,
        order: SafetyOrder,
        goal: Goal,
        facts: Sequence[frozenset[Hashable]],
        exhaustive: bool = False,
    ) -> None:
        self.order = order
        self.goal = goal
        self.exhaustive = exhaustive
        self.everyone = (1 << len(order)) - 1
        self.measured: dict[int, Measurement] = {}
        self.failed: dict[int, str] = {}
        self.verified: list[int] = []
        self._verifying: int | None = None  # the configuration next() named to verify a star
        self._measured_bits = 0
        self._failed_bits = 0
        self._meets_below = 0  # configurations below a decisive measurement that meets the budget
        self._misses_above = 0  # configurations above a decisive measurement that misses it
        self._features = _features(facts)

    # -- state --------------------------------------------------------------------------------------
    def record(self, index: int, values: Sequence[float]) -> Measurement:
        """Take the runs of configuration ``index``."""
        if not values:
            raise ValueError("a measurement needs at least one run")
        measurement = Measurement.of(values, self.goal)
        self.measured[index] = measurement
        self._measured_bits |= 1 << index
        if index == self._verifying:
            self.verified.append(index)
        if measurement.decisive:
            if measurement.meets:
                self._meets_below |= self.order.below[index]
            else:
                self._misses_above |= self.order.above[index]
        return measurement

    def record_failure(self, index: int, reason: str) -> None:
        """Configuration ``index`` could not be measured: settled, used for nothing else."""
        self.failed[index] = reason
        self._failed_bits |= 1 << index
        if index == self._verifying:
            self.verified.append(index)

    @property
    def _settled_bits(self) -> int:
        return self._measured_bits | self._failed_bits

    def _inferred_meets(self) -> int:
        return self._meets_below & ~self._misses_above & ~self._settled_bits

    def _inferred_misses(self) -> int:
        return self._misses_above & ~self._meets_below & ~self._settled_bits

    def _unknown(self) -> int:
        return self.everyone & ~self._settled_bits & ~(self._meets_below ^ self._misses_above)

    def _meeting(self) -> int:
        measured = sum(1 << i for i, m in self.measured.items() if m.meets)
        return measured | self._inferred_meets()

    @property
    def resolved(self) -> int:
        """How many configurations are measured or inferred."""
        return len(self.order) - self._unknown().bit_count()

    def stars(self) -> list[int]:
        meeting = self._meeting()
        return [i for i in members(meeting) if not self.order.above[i] & meeting]

    # -- what to measure ------------------------------------------------------------------------------
    def next(self) -> int | None:
        """The configuration to measure next, or None when the answer is settled."""
        if self.exhaustive:
            rest = self.everyone & ~self._settled_bits
            return members(rest)[0] if rest else None
        unknown = self._unknown()
        if unknown:
            return self._choose(unknown)
        self._verifying = self._suspect()
        return self._verifying

    def _choose(self, unknown: int) -> int:
        order = self.order
        candidates = members(unknown)
        if not self.measured:  # start at the least safe: it meets the budget if anything does
            return min(candidates, key=lambda u: (order.below[u].bit_count(), u))
        predicted = self._predict(candidates)
        if predicted is None:  # no model yet: split the unknown configurations evenly
            return max(
                candidates,
                key=lambda u: (min((order.below[u] & unknown).bit_count(), (order.above[u] & unknown).bit_count()), -u),
            )
        meets = {u: self.goal.meets(predicted[u]) for u in candidates}
        # On the edge of the unknown region a right prediction is a certificate measurement:
        # a topmost unknown that meets is a star, a bottommost one that misses is a first miss.
        edge = [u for u in candidates if meets[u] and not order.above[u] & unknown]
        edge += [u for u in candidates if not meets[u] and not order.below[u] & unknown]
        if not edge:
            meeting = self._meeting() | sum(1 << u for u in candidates if meets[u])
            edge = [
                u
                for u in candidates
                if (meets[u] and not order.above[u] & meeting)
                or (not meets[u] and not order.below[u] & ~meeting & self.everyone)
            ] or candidates

        spread = max(self._model_error(), 0.01)

        def settles(u: int) -> float:
            """How many unknown configurations measuring ``u`` is expected to settle."""
            right = self._likely_right(predicted[u], spread)
            below, above = (order.below[u] & unknown).bit_count(), (order.above[u] & unknown).bit_count()
            return right * below + (1 - right) * above if meets[u] else right * above + (1 - right) * below

        return max(edge, key=lambda u: (settles(u), -u))

    def _suspect(self) -> int | None:
        """A configuration immediately above a star, inferred to miss, that the model says might not."""
        unmeasured = [
            c for s in self.stars() for c in self.order.covers(s) if c not in self.measured and c not in self.failed
        ]
        if not unmeasured:
            return None
        predicted = self._predict(unmeasured)
        if predicted is None:
            return None
        margin = self._model_error()
        relaxed = Goal(
            self.goal.budget * ((1 - margin) if self.goal.higher_is_better else (1 + margin)),
            self.goal.higher_is_better,
        )
        for cover in sorted(set(unmeasured)):
            if relaxed.meets(predicted[cover]):
                return cover
        return None

    # -- the performance model --------------------------------------------------------------------------
    def _fit(self) -> np.ndarray | None:
        """Per-fact costs (cost = 1/value when higher is better, else the value) fitted to the measurements."""
        usable = [(i, m.value) for i, m in self.measured.items() if m.value > 0 and math.isfinite(m.value)]
        if not usable:
            return None
        rows = self._features[[i for i, _ in usable]]
        costs = np.array([1 / v if self.goal.higher_is_better else v for _, v in usable])
        return _fit_costs(rows, costs)

    def _predict(self, indices: Sequence[int]) -> dict[int, float] | None:
        weights = self._fit()
        if weights is None:
            return None
        costs = self._features[list(indices)] @ weights
        return {i: self._value(c) for i, c in zip(indices, costs, strict=True)}

    def _value(self, cost: float) -> float:
        if not self.goal.higher_is_better:
            return cost
        return 1 / cost if cost > 0 else math.inf

    def _likely_right(self, predicted: float, spread: float) -> float:
        """P(a prediction is on the right side of the budget), the model's relative error being ``spread``."""
        if not math.isfinite(predicted) or predicted <= 0:
            return 1.0
        return NormalDist().cdf(abs(math.log(predicted / self.goal.budget)) / spread)

    def _model_error(self) -> float:
        """The model's relative error on the measured configurations (90th percentile)."""
        predicted = self._predict(list(self.measured))
        if predicted is None:
            return 0.0
        errors = sorted(abs(predicted[i] - m.value) / abs(m.value) for i, m in self.measured.items() if m.value)
        return errors[int(0.9 * (len(errors) - 1))] if errors else 0.0

    # -- the answer ---------------------------------------------------------------------------------------
    def answer(self) -> Answer:
        order = self.order
        stars = self.stars()
        meeting = self._meeting()
        missing = self.everyone & ~meeting & ~self._unknown() & ~self._failed_bits
        first_misses = [i for i in members(missing) if not order.below[i] & missing]
        certificate = tuple(sorted(stars + first_misses))
        certainties = [self.measured[i].certainty if i in self.measured else None for i in certificate]
        known = [c for c in certainties if c is not None]
        confidence = math.prod(known) if certificate and len(known) == len(certainties) else None
        inferred = {i: True for i in members(self._inferred_meets())}
        inferred.update({i: False for i in members(self._inferred_misses())})
        violations, compared, edge_violations, edges = [], 0, 0, 0
        for lower, low in self.measured.items():
            covers = set(order.covers(lower))
            for upper in members(order.above[lower] & self._measured_bits):
                compared += 1
                edges += upper in covers
                high = self.measured[upper].value
                if (high > low.value) if self.goal.higher_is_better else (high < low.value):
                    violations.append((lower, upper))
                    edge_violations += upper in covers
        return Answer(
            stars=tuple(stars),
            measured=dict(self.measured),
            inferred=inferred,
            verified=tuple(self.verified),
            failed=dict(self.failed),
            certificate=certificate,
            confidence=confidence,
            violations=tuple(violations),
            compared=compared,
            edge_violations=edge_violations,
            edges_compared=edges,
            exhaustive=self.exhaustive,
        )


def _features(facts: Sequence[frozenset[Hashable]]) -> np.ndarray:
    """One row per configuration: a 1 for the base cost, then one column per group of facts that
    always occur together in this space (facts every configuration has are part of the base)."""
    owners: dict[Hashable, list[int]] = {}
    for i, owned in enumerate(facts):
        for fact in owned:
            owners.setdefault(fact, []).append(i)
    groups = sorted({tuple(rows) for rows in owners.values() if len(rows) < len(facts)})
    features = np.zeros((len(facts), len(groups) + 1))
    features[:, 0] = 1.0
    for column, rows in enumerate(groups, 1):
        features[list(rows), column] = 1.0
    return features


def _fit_costs(rows: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Ridge least squares with every fact's cost kept >= 0 (safer is never faster): facts whose
    cost comes out negative are fixed at 0 and the rest refitted."""
    free = np.ones(rows.shape[1], dtype=bool)
    while True:
        weights = np.zeros(rows.shape[1])
        chosen = rows[:, free]
        penalty = RIDGE * np.eye(chosen.shape[1])
        penalty[0, 0] = 0.0  # the base cost is not shrunk
        weights[free] = np.linalg.solve(chosen.T @ chosen + penalty, chosen.T @ costs)
        negative = (weights < 0) & free
        negative[0] = False
        if not negative.any():
            return weights
        free &= ~negative


def search(
    order: SafetyOrder,
    goal: Goal,
    facts: Sequence[frozenset[Hashable]],
    oracle: Callable[[int], Sequence[float]],
    exhaustive: bool = False,
) -> Answer:
    """Run the search to the end, asking ``oracle(index)`` for the runs of each configuration it measures."""
    state = Search(order, goal, facts, exhaustive)
    while (index := state.next()) is not None:
        state.record(index, oracle(index))
    return state.answer()
