"""The monotone search: the safest configurations that meet a budget, measuring as few as it can.

Pure (no IO): :class:`Search` proposes configurations to measure (one, or a batch for several
hosts) and is told the results; :func:`search` drives it with an oracle. Assumption: safer is
never faster, so a configuration below one that meets the budget meets it, and one above a
configuration that misses it misses it. The assumption is checked, not trusted:

- Noise: each measurement is several runs; its *certainty* is the probability that the true
  value lies on the measured side of the budget (normal approximation). Only decisive
  measurements (certainty >= ``DECISIVE``) are used to infer others; the rest stand for
  themselves, so the configurations around them get measured too.
- Contradictions: a measurement that misses the budget below one that meets it shows that the
  order does not hold there, so neither is used to infer anything: what they would have settled
  is measured instead.
- Choice: a performance model (each safety fact adds a non-negative cost per unit of work,
  fitted by least squares to what was measured) predicts the unknown configurations. The search
  measures the predicted boundary: predicted stars and predicted first misses, which are what a
  certificate of the answer consists of, the one expected to settle the most unknowns first.
- Verification: every configuration immediately safer than a star is measured (an unmeasured
  one that meets the budget would replace the star), and so is every configuration inferred to
  miss whose *doubt* exceeds ``DOUBT``: the chance that it beats a measured miss below it by
  more than the ratio between the two allows, against the spread that measured pairs of
  neighbours show (heavy, Laplace tails: most pairs obey the order, a few stray far). The ratio
  is the model's fitted without keeping costs >= 0, so where measurements show a fact making
  configurations faster, what is inferred across it is doubted, and measured.
- Confidence: the answer is right when every star meets the budget and every configuration
  outside the stars' down-sets misses it. The certainty of each measured one times, for each
  inferred miss, one less its doubt; an answer resting on inference is never certain.
- Failures: a configuration whose benchmark cannot run is settled as failed. It says nothing about
  its neighbours (a C extension that refuses a subinterpreter runs in a safer process), so nothing
  is inferred from it, and it is never a star.
"""

from __future__ import annotations

import copy
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
# An inferred miss the model gives a larger chance of meeting the budget than this is measured.
DOUBT = 0.1
# The model's relative error assumed before measurements tell it (and how many measurements that
# assumption weighs): with few measurements, inference is doubted more.
PRIOR_ERROR, PRIOR_WEIGHT = 0.1, 3
# Printed with three decimals, an answer that rests on inference never reads as certain.
MOST_CONFIDENT_INFERENCE = 0.999
# Standard error of the median relative to that of the mean, for normally distributed runs.
_MEDIAN_EFFICIENCY = math.sqrt(math.pi / 2)


@dataclass(frozen=True)
class Goal:
    budget: float
    higher_is_better: bool = True
    statistic: str = "median"  # how the runs of one configuration become its value: median or mean

    def meets(self, value: float) -> bool:
        return value >= self.budget if self.higher_is_better else value <= self.budget

    def margin(self, value: float) -> float:
        """How far ``value`` (> 0) is on the good side of the budget, in log units (negative: it misses)."""
        ratio = math.log(value / self.budget)
        return ratio if self.higher_is_better else -ratio


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
    verified: tuple[int, ...]  # configurations measured although inference had settled them
    failed: dict[int, str]  # configuration -> why its benchmark could not run
    certificate: tuple[int, ...]  # the measurements the answer rests on: stars and first misses
    # P(the answer is right): the certainty of the stars and of every measured miss not below a star,
    # times inference_confidence
    confidence: float | None
    inference_confidence: float  # P(every configuration inferred to miss the budget misses it), by the model
    contradicted: tuple[int, ...]  # decisive measurements not used to infer: a measured pair contradicts them
    violations: tuple[tuple[int, int], ...]  # measured (less safe, safer) pairs where the safer did better
    compared: int  # measured pairs the order compares
    edge_violations: int  # violations between a configuration and one immediately safer
    edges_compared: int
    exhaustive: bool
    batches: int  # how many times the search proposed configurations to measure


class Search:
    """The search as a state machine: ``propose()`` names configurations to measure, ``record()`` takes their runs."""

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
        self.contradicted: set[int] = set()
        self.batches = 0
        self._measured_bits = 0
        self._failed_bits = 0
        self._meets_below = 0  # configurations below a trusted measurement that meets the budget
        self._misses_above = 0  # configurations above a trusted measurement that misses it
        self._features = _features(facts)
        self._model: dict[str, object] = {}  # fitted costs and errors for the current measurements

    # -- state --------------------------------------------------------------------------------------
    def record(self, index: int, values: Sequence[float]) -> Measurement:
        """Take the runs of configuration ``index``."""
        if not values:
            raise ValueError("a measurement needs at least one run")
        if not self.exhaustive and not self._unknown() >> index & 1 and index not in self.measured:
            self.verified.append(index)
        measurement = Measurement.of(values, self.goal)
        self.measured[index] = measurement
        self._measured_bits |= 1 << index
        self._infer()
        return measurement

    def record_failure(self, index: int, reason: str) -> None:
        """Configuration ``index`` could not be measured: settled, used for nothing else."""
        if not self.exhaustive and not self._unknown() >> index & 1 and index not in self.measured:
            self.verified.append(index)
        self.failed[index] = reason
        self._failed_bits |= 1 << index
        self._model = {}

    def _infer(self) -> None:
        """Settle what the decisive measurements imply, except where measured pairs contradict the order."""
        self._model = {}
        order = self.order
        decisive = [(i, m.meets) for i, m in self.measured.items() if m.decisive]
        meet_bits = sum(1 << i for i, meets in decisive if meets)
        miss_bits = sum(1 << i for i, meets in decisive if not meets)
        self._meets_below = self._misses_above = 0
        self.contradicted = set()
        for i, meets in decisive:
            if (order.below[i] & miss_bits) if meets else (order.above[i] & meet_bits):
                self.contradicted.add(i)
            elif meets:
                self._meets_below |= order.below[i]
            else:
                self._misses_above |= order.above[i]

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
        proposed = self.propose(1)
        return proposed[0] if proposed else None

    def propose(self, most: int = 1) -> list[int]:
        """Up to ``most`` configurations to measure now (none: the answer is settled).

        The first is the one the search would measure alone. Each further one is chosen as if the
        ones before had come out as the model predicts, preferring configurations incomparable to
        them: whatever those turn out to be, they imply nothing about it, so its host's run is not wasted.
        """
        if self.exhaustive:
            proposed = members(self.everyone & ~self._settled_bits)[:most]
        else:
            proposed, state, comparable = [], self, 0
            while len(proposed) < most:
                index = state._next_one(comparable)
                if index is None:  # settled if the predictions hold: hedge with what they would settle
                    rest = self._unknown() & ~sum(1 << i for i in proposed)
                    if not rest:
                        break
                    index = self._choose(rest, comparable)
                proposed.append(index)
                comparable |= self.order.below[index] | self.order.above[index] | 1 << index
                if len(proposed) < most:
                    state = state._believing(index)
        self.batches += bool(proposed)
        return proposed

    def _next_one(self, comparable: int) -> int | None:
        unknown = self._unknown()
        if unknown:
            return self._choose(unknown, comparable)
        return self._check(comparable)

    def _believing(self, index: int) -> Search:
        """A copy of this search that takes the model's prediction for ``index`` as measured."""
        predicted = self._predict([index])
        value = predicted[index] if predicted is not None and math.isfinite(predicted[index]) else self.goal.budget
        believer = copy.copy(self)
        believer.measured = {**self.measured, index: Measurement((value,), value, self.goal.meets(value), None)}
        believer.verified = []
        believer._measured_bits = self._measured_bits | 1 << index
        believer._infer()
        return believer

    def _choose(self, unknown: int, comparable: int) -> int:
        order = self.order
        candidates = members(unknown)
        if not self.measured:  # start at the least safe: it meets the budget if anything does
            return min(candidates, key=lambda u: (order.below[u].bit_count(), u))
        predicted = self._predict(candidates)
        if predicted is None:  # no model yet: split the unknown configurations evenly
            return max(
                candidates,
                key=lambda u: (
                    not comparable >> u & 1,
                    min((order.below[u] & unknown).bit_count(), (order.above[u] & unknown).bit_count()),
                    -u,
                ),
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

        # A configuration immediately safer than a measured star that is predicted to miss will be
        # measured to verify the star anyway: measured now, it also settles what it can.
        required = {c for s in self.stars() for c in order.covers(s) if unknown >> c & 1 and not meets[c]}
        incomparable = [u for u in candidates if not comparable >> u & 1]
        edge = (
            [u for u in incomparable if u in required]
            or [u for u in edge if not comparable >> u & 1]
            or incomparable
            or [u for u in edge if u in required]
            or edge
        )
        return max(edge, key=lambda u: (settles(u), -u))

    def _check(self, comparable: int) -> int | None:
        """With nothing unknown: an unmeasured configuration immediately safer than a star, else the
        inferred miss the model most doubts (if it doubts one more than ``DOUBT``), else None."""
        unsettled = ~self._measured_bits & ~self._failed_bits
        covers = sorted({c for s in self.stars() for c in self.order.covers(s) if unsettled >> c & 1})
        if covers:
            return next((c for c in covers if not comparable >> c & 1), covers[0])
        doubts = self._doubts()
        doubted = sorted((-p, z) for z, p in doubts.items() if p > DOUBT)
        return next((z for _, z in doubted if not comparable >> z & 1), doubted[0][1] if doubted else None)

    # -- the performance model --------------------------------------------------------------------------
    def _usable(self) -> list[tuple[int, float]]:
        return [(i, m.value) for i, m in self.measured.items() if m.value > 0 and math.isfinite(m.value)]

    def _weights(self, monotone: bool = True) -> np.ndarray | None:
        """Per-fact costs (cost = 1/value when higher is better, else the value) fitted to the
        measurements; ``monotone``: kept >= 0, as the order assumes. Without, a fact that makes
        configurations faster shows as a negative cost, so doubts can see where the order fails."""
        key = "weights" if monotone else "free_weights"
        if key not in self._model:
            usable = self._usable()
            rows = self._features[[i for i, _ in usable]]
            costs = np.array([1 / v if self.goal.higher_is_better else v for _, v in usable])
            self._model[key] = _fit_costs(rows, costs, monotone) if usable else None
        return self._model[key]  # type: ignore[return-value]

    def _predict(self, indices: Sequence[int], monotone: bool = True) -> dict[int, float] | None:
        weights = self._weights(monotone)
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
        if "error" not in self._model:
            predicted = self._predict(list(self.measured))
            errors = (
                sorted(abs(predicted[i] - m.value) / abs(m.value) for i, m in self.measured.items() if m.value)
                if predicted is not None
                else []
            )
            self._model["error"] = errors[int(0.9 * (len(errors) - 1))] if errors else 0.0
        return self._model["error"]  # type: ignore[return-value]

    def _pair_error(self) -> float:
        """How far measured pairs of comparable configurations stray from the model's ratio between
        them (log scale, root mean square, shrunk towards PRIOR_ERROR): how much a configuration
        can beat what a measured neighbour and the model say of it. Noise and violations of the
        order both show here. The model is the one free to learn that a fact makes things faster."""
        if "pair_error" not in self._model:
            measured = [(i, m.value) for i, m in self.measured.items() if m.value > 0 and math.isfinite(m.value)]
            predicted = self._predict([i for i, _ in measured], monotone=False) or {}
            residual = {
                i: math.log(value / predicted[i]) for i, value in measured if 0 < predicted.get(i, 0) < math.inf
            }
            bits = sum(1 << i for i in residual)
            squares = [
                (residual[b] - residual[a]) ** 2 for a in residual for b in self.order.covers(a) if bits >> b & 1
            ]
            total = sum(squares) + PRIOR_WEIGHT * PRIOR_ERROR**2
            self._model["pair_error"] = math.sqrt(total / (len(squares) + PRIOR_WEIGHT))
        return self._model["pair_error"]  # type: ignore[return-value]

    def _doubts(self) -> dict[int, float]:
        """Configuration inferred to miss the budget -> the chance that it meets it after all.

        Each trusted measured miss ``x`` below it bounds it: to meet the budget it must beat ``x``
        by the factor ``budget / x``, against the ratio between the two of the model free to learn
        that a fact makes things faster (a measured violation of the order, generalized), with the
        spread that measured pairs show (``_pair_error``). The tightest bound counts.
        """
        inferred = members(self._inferred_misses())
        if not inferred:
            return {}
        supports = [
            (x, m)
            for x, m in self.measured.items()
            if m.decisive and not m.meets and x not in self.contradicted and 0 < m.value < math.inf
        ]
        predicted = self._predict(inferred + [x for x, _ in supports], monotone=False)
        spread = self._pair_error()
        doubts = {}
        for z in inferred:
            doubt = 1.0
            for x, m in supports:
                if self.order.above[x] >> z & 1:
                    if predicted is None or not (0 < predicted[z] < math.inf and 0 < predicted[x] < math.inf):
                        shift = 0.0
                    else:
                        shift = self.goal.margin(predicted[x]) - self.goal.margin(predicted[z])
                    needed = shift - self.goal.margin(m.value)  # both >= 0 when the model and x agree
                    doubt = min(doubt, _tail(needed / spread))
            doubts[z] = doubt
        return doubts

    # -- the answer ---------------------------------------------------------------------------------------
    def answer(self) -> Answer:
        order = self.order
        stars = self.stars()
        meeting = self._meeting()
        missing = self.everyone & ~meeting & ~self._unknown() & ~self._failed_bits
        first_misses = [i for i in members(missing) if not order.below[i] & missing]
        certificate = tuple(sorted(stars + first_misses))
        # The answer is right when every star meets the budget and every configuration outside the
        # stars' down-sets misses it (what lies below a star cannot change the answer): each of
        # those measured counts with its certainty, each inferred with the model's chance it misses.
        below_stars = 0
        for star in stars:
            below_stars |= order.below[star] | 1 << star
        doubts = {z: p for z, p in self._doubts().items() if not below_stars >> z & 1}
        inference = math.prod(1 - p for p in doubts.values())
        if doubts:
            inference = min(inference, MOST_CONFIDENT_INFERENCE)
        rests_on = stars + [i for i in self.measured if not below_stars >> i & 1]
        certainties = [self.measured[i].certainty for i in rests_on]
        known = [c for c in certainties if c is not None]
        confidence = None
        if rests_on and len(known) == len(certainties):
            confidence = math.prod(known) * inference
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
            inference_confidence=inference,
            contradicted=tuple(sorted(self.contradicted)),
            violations=tuple(violations),
            compared=compared,
            edge_violations=edge_violations,
            edges_compared=edges,
            exhaustive=self.exhaustive,
            batches=self.batches,
        )


def _tail(deviations: float) -> float:
    """P(X > deviations) for a Laplace variable of unit standard deviation: heavier-tailed than a
    normal one, as violations of the order are (most pairs obey it, a few stray far)."""
    if deviations <= 0:
        return 1 - 0.5 * math.exp(math.sqrt(2) * deviations)
    return 0.5 * math.exp(-math.sqrt(2) * deviations)


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


def _fit_costs(rows: np.ndarray, costs: np.ndarray, monotone: bool = True) -> np.ndarray:
    """Ridge least squares; ``monotone``: with every fact's cost kept >= 0 (safer is never faster):
    facts whose cost comes out negative are fixed at 0 and the rest refitted."""
    free = np.ones(rows.shape[1], dtype=bool)
    while True:
        weights = np.zeros(rows.shape[1])
        chosen = rows[:, free]
        penalty = RIDGE * np.eye(chosen.shape[1])
        penalty[0, 0] = 0.0  # the base cost is not shrunk
        weights[free] = np.linalg.solve(chosen.T @ chosen + penalty, chosen.T @ costs)
        negative = (weights < 0) & free
        negative[0] = False
        if not monotone or not negative.any():
            return weights
        free &= ~negative


def sequential_count(
    order: SafetyOrder, goal: Goal, facts: Sequence[frozenset[Hashable]], answer: Answer
) -> tuple[int, bool]:
    """How many configurations the search measures one at a time on the runs ``answer`` has (what
    its batches compare with), and whether that is exact: False when it asks for one that was not
    measured, so the count is a lower bound."""
    state = Search(order, goal, facts)
    while (index := state.next()) is not None:
        if index in answer.failed:
            state.record_failure(index, answer.failed[index])
        elif index in answer.measured:
            state.record(index, answer.measured[index].values)
        else:
            return len(state.measured) + 1, False
    return len(state.measured), True


def search(
    order: SafetyOrder,
    goal: Goal,
    facts: Sequence[frozenset[Hashable]],
    oracle: Callable[[int], Sequence[float]],
    exhaustive: bool = False,
    batch: int = 1,
) -> Answer:
    """Run the search to the end, asking ``oracle(index)`` for the runs of each configuration it
    measures, ``batch`` at a time (as many as there are hosts)."""
    state = Search(order, goal, facts, exhaustive)
    while proposed := state.propose(batch):
        for index in proposed:
            state.record(index, oracle(index))
    return state.answer()
