"""The monotone search on synthetic spaces: it equals brute force when monotonicity holds, measures
fewer, handles noise by not inferring from ambiguous measurements, and reports what it did."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexos.explore.order import SafetyOrder, documented_order, members, safety_facts
from flexos.explore.search import MOST_CONFIDENT_INFERENCE, Goal, Measurement, Search, search, sequential_count
from flexos.explore.space import Configuration, load_space

SPACE = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
explore:
  components: {a: {short: A}, b: {short: B}, c: {short: C}, d: {short: D}}
  compartments: 3
  drivers: [process]
  hardening: {library: {H: {audit: {deny: [subprocess]}}}}
  constraints: {together: [[a, b]]}
  benchmark: {command: 'echo 1'}
"""


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Configuration], SafetyOrder, list[frozenset]]:
    path = tmp_path_factory.mktemp("search") / "space.yaml"
    path.write_text(SPACE)
    configs = load_space(path)[0].configurations()
    return configs, documented_order(configs), [safety_facts(c) for c in configs]


def brute_force(order: SafetyOrder, goal: Goal, values: list[float]) -> list[int]:
    meeting = sum(1 << i for i, v in enumerate(values) if goal.meets(v))
    return [i for i in members(meeting) if not order.above[i] & meeting]


def monotone_values(facts: list[frozenset], costs: dict, base: float) -> list[float]:
    """Throughput where every safety fact adds its own time per request: safer is never faster."""
    return [1 / (base + sum(costs[f] for f in owned)) for owned in facts]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_equals_brute_force_when_monotone(space, data: st.DataObject) -> None:
    configs, order, facts = space
    every = sorted(set().union(*facts), key=repr)
    costs = {f: data.draw(st.floats(0, 1), label=repr(f)) for f in every}
    values = monotone_values(facts, costs, base=1.0)
    budget = data.draw(st.floats(min(values) * 0.9, max(values) * 1.1))
    goal = Goal(budget, higher_is_better=True)
    asked: list[int] = []

    def oracle(i: int) -> list[float]:
        asked.append(i)
        return [values[i]]

    answer = search(order, goal, facts, oracle)
    assert sorted(answer.stars) == brute_force(order, goal, values)
    assert len(asked) == len(set(asked)) == len(answer.measured)  # each configuration measured at most once
    assert set(answer.measured) | set(answer.inferred) == set(range(len(configs)))
    assert all(answer.inferred[i] == goal.meets(values[i]) for i in answer.inferred)  # inferences are right
    assert answer.violations == ()
    assert answer.confidence is None  # one run each: nothing known about noise


def test_measures_few_on_an_additive_space(space) -> None:
    configs, order, facts = space
    every = sorted(set().union(*facts), key=repr)
    costs = {f: 0.05 + 0.1 * (i % 4) for i, f in enumerate(every)}
    values = monotone_values(facts, costs, base=1.0)
    measured = []
    for budget in sorted(values)[5::10]:
        answer = search(order, Goal(budget), facts, lambda i: [values[i]])
        assert sorted(answer.stars) == brute_force(order, Goal(budget), values)
        measured.append(len(answer.measured))
    # The model fits an additive space exactly, so the search measures little beyond a certificate
    # and the stars' safer neighbours (up to 14 here: every one is measured to verify its star).
    assert max(measured) < len(configs) / 2, measured


def test_lower_is_better(space) -> None:
    _, order, facts = space
    latency = [1 / v for v in monotone_values(facts, {f: 0.2 for f in set().union(*facts)}, base=1.0)]
    goal = Goal(3.0, higher_is_better=False)
    answer = search(order, goal, facts, lambda i: [latency[i]])
    assert sorted(answer.stars) == brute_force(order, goal, latency)
    assert all(latency[i] <= 3.0 for i in answer.stars)


def test_exhaustive_measures_everything_and_counts_violations(space) -> None:
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    bottom = next(i for i in range(len(configs)) if order.below[i] == 0)
    cover = order.covers(bottom)[0]
    values[cover] = values[bottom] * 2  # a safer configuration that is faster
    answer = search(order, Goal(0.0), facts, lambda i: [values[i]], exhaustive=True)
    assert len(answer.measured) == len(configs) and not answer.inferred
    assert answer.exhaustive
    assert (bottom, cover) in answer.violations
    assert answer.edge_violations >= 1
    tops = [i for i in range(len(configs)) if order.above[i] == 0]
    assert sorted(answer.stars) == tops  # budget 0: everything meets it


def test_ambiguous_measurements_are_not_used_to_infer(space) -> None:
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    bottom = next(i for i in range(len(configs)) if order.below[i] == 0)
    budget = values[bottom] * 1.001
    # The least safe configuration's runs straddle the budget: it misses it, but not surely.
    runs = {bottom: [values[bottom] * 0.9, values[bottom] * 1.05, values[bottom] * 1.0]}
    state = Search(order, Goal(budget, statistic="mean"), facts)
    first = state.next()
    assert first == bottom
    measurement = state.record(bottom, runs[bottom])
    assert not measurement.meets and measurement.certainty < 0.95 and not measurement.decisive
    # Nothing above it was inferred to miss: the next measurement is still needed.
    assert state.resolved == 1
    assert state.next() is not None
    clear = state.record(bottom, [values[bottom] * 0.5] * 3)  # measured again, clearly below the budget
    assert clear.decisive and state.resolved == len(configs)
    assert state.next() is None
    answer = state.answer()
    assert answer.stars == () and answer.certificate == (bottom,)
    # Its runs leave no doubt, but every other configuration is inferred to miss: not certain.
    assert answer.confidence == answer.inference_confidence <= MOST_CONFIDENT_INFERENCE


def test_certainty_of_a_measurement() -> None:
    goal = Goal(100.0, statistic="mean")
    sure = Measurement.of([120, 121, 119], goal)
    assert sure.meets and sure.value == 120 and sure.certainty > 0.999
    unsure = Measurement.of([90, 110, 101], goal)
    assert unsure.meets and 0.5 < unsure.certainty < 0.95
    assert Measurement.of([99], goal).certainty is None
    below = Measurement.of([80, 85, 82], Goal(100.0, statistic="median"))
    assert not below.meets and below.value == 82 and below.certainty > 0.999
    latency = Measurement.of([10, 11, 12], Goal(20.0, higher_is_better=False))
    assert latency.meets and latency.certainty > 0.999


def test_confidence_multiplies_the_certificate(space) -> None:
    _, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    budget = sorted(values)[len(values) // 2]
    noise = [0.98, 1.0, 1.02]
    answer = search(order, Goal(budget, statistic="mean"), facts, lambda i: [values[i] * n for n in noise])
    assert sorted(answer.stars) == brute_force(order, Goal(budget), values)
    below_stars = {i for star in answer.stars for i in members(order.below[star])}
    product = 1.0
    for i in set(answer.measured) - below_stars:  # the stars and every measured miss not below one
        product *= answer.measured[i].certainty
    assert answer.confidence == pytest.approx(product * answer.inference_confidence)
    assert 0 < answer.inference_confidence <= MOST_CONFIDENT_INFERENCE  # some configurations are inferred to miss
    assert set(answer.stars) <= set(answer.certificate) <= set(answer.measured)


def test_failed_configurations_settle_only_themselves(space) -> None:
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    bottom = next(i for i in range(len(configs)) if order.below[i] == 0)
    state = Search(order, Goal(min(values) * 0.5), facts)
    assert state.next() == bottom
    state.record_failure(bottom, "cannot run")
    assert state.resolved == 1  # a failure says nothing about the configurations around it
    # The safest configurations cannot run either: the stars are the safest of the others.
    tops = {i for i in range(len(configs)) if order.above[i] == 0}
    failed = tops | {bottom}
    while (index := state.next()) is not None:
        if index in failed:
            state.record_failure(index, "cannot run")
        else:
            state.record(index, [values[index]])
    answer = state.answer()
    runnable = [v if i not in failed else 0.0 for i, v in enumerate(values)]
    assert sorted(answer.stars) == brute_force(order, Goal(min(values) * 0.5), runnable)
    assert set(answer.failed) == failed and all(reason == "cannot run" for reason in answer.failed.values())
    assert not failed & (set(answer.stars) | set(answer.inferred) | set(answer.measured) | set(answer.certificate))
    assert set(answer.measured) | set(answer.inferred) | failed == set(range(len(configs)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batches_equal_brute_force_when_monotone(space, data: st.DataObject) -> None:
    configs, order, facts = space
    every = sorted(set().union(*facts), key=repr)
    values = monotone_values(facts, {f: data.draw(st.floats(0, 1), label=repr(f)) for f in every}, base=1.0)
    goal = Goal(data.draw(st.floats(min(values) * 0.9, max(values) * 1.1)))
    batch = data.draw(st.sampled_from([2, 3, 8]))
    answer = search(order, goal, facts, lambda i: [values[i]], batch=batch)
    assert sorted(answer.stars) == brute_force(order, goal, values)
    assert set(answer.measured) | set(answer.inferred) == set(range(len(configs)))
    assert len(answer.measured) / batch <= answer.batches <= len(answer.measured)


def test_a_batch_of_one_is_the_sequential_search(space) -> None:
    _, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    goal = Goal(sorted(values)[len(values) // 2])
    state = Search(order, goal, facts)
    sequence = []
    while (index := state.next()) is not None:
        sequence.append(index)
        state.record(index, [values[index]])
    answer = search(order, goal, facts, lambda i: [values[i]], batch=1)
    assert list(answer.measured) == sequence and answer.batches == len(sequence)


def test_a_batch_prefers_configurations_that_imply_nothing_of_each_other(space) -> None:
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    state = Search(order, Goal(sorted(values)[len(values) // 2]), facts)
    batches = 0
    while batch := state.propose(4):
        batches += 1
        assert len(batch) == len(set(batch)) and not set(batch) & set(state.measured)
        for k, index in enumerate(batch[1:], 1):
            earlier = 0
            for i in batch[:k]:
                earlier |= order.above[i] | order.below[i] | 1 << i
            if earlier >> index & 1:  # comparable to an earlier one: only if nothing unknown is not
                assert all(earlier >> u & 1 for u in members(state._unknown())), configs[index].name
        for index in batch:
            state.record(index, [values[index]])
    assert batches == state.batches < len(state.measured)


def test_a_safer_neighbour_that_breaks_the_order_is_found(space) -> None:
    """A configuration immediately above a star, inferred to miss from a measured miss below it,
    meets the budget after all: the search measures it and the answer moves up."""
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    goal = Goal(sorted(values)[len(values) // 2])
    found = 0
    for star in search(order, goal, facts, lambda i: [values[i]]).stars:
        for cover in order.covers(star):
            broken = list(values)
            broken[cover] = goal.budget * 1.01  # faster than configurations below it that miss
            answer = search(order, goal, facts, lambda i, broken=broken: [broken[i]])
            assert sorted(answer.stars) == brute_force(order, goal, broken), configs[cover].name
            assert cover in answer.measured
            found += 1
    assert found


def test_contradicted_measurements_infer_nothing(space) -> None:
    configs, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    bottom = next(i for i in range(len(configs)) if order.below[i] == 0)
    cover = order.covers(bottom)[0]
    state = Search(order, Goal(values[bottom] * 1.1), facts)
    state.record(bottom, [values[bottom]] * 3)  # misses the budget: everything above misses too ...
    assert state.resolved == len(configs) and state.stars() == []
    state.record(cover, [values[bottom] * 1.2] * 3)  # ... but a safer one meets it
    assert state.contradicted == {bottom, cover}
    assert state.resolved == 2  # what the bottom settled is open again: the two stand for themselves
    assert state.next() not in (bottom, cover)
    assert state.answer().contradicted == (min(bottom, cover), max(bottom, cover))


def test_the_sequential_count_replays_the_batches_runs(space) -> None:
    """With batches the report says how many one host would have measured: the sequential search
    replayed on the runs the batches took (a lower bound when it needs one they did not take)."""
    _, order, facts = space
    values = monotone_values(facts, {f: 0.1 for f in set().union(*facts)}, base=1.0)
    exact = 0
    for budget in sorted(set(values)):
        goal = Goal(budget)
        sequential = search(order, goal, facts, lambda i: [values[i]])
        count, is_exact = sequential_count(
            order, goal, facts, search(order, goal, facts, lambda i: [values[i]], batch=4)
        )
        if is_exact:
            assert count == len(sequential.measured)
            exact += 1
        else:
            assert count <= len(sequential.measured)
        assert sequential_count(order, goal, facts, sequential) == (len(sequential.measured), True)
    assert exact
