"""One exploration: the space, its order, the search driven through an engine, the report written.

:func:`explore` is what ``flexos explore`` runs; :func:`settle` is its measuring loop alone (the
search proposes as many configurations as the engine has hosts, the runner measures them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flexos import drivers
from flexos.errors import DriverUnavailable
from flexos.explore import report
from flexos.explore.engines import Engine, make_engine
from flexos.explore.engines.local import LocalEngine
from flexos.explore.order import SafetyOrder, documented_order, read_order, safety_facts
from flexos.explore.report import Execution
from flexos.explore.runner import BenchmarkFailed, Runner, bench_of, cached_runs
from flexos.explore.search import Answer, Goal, Search, sequential_count
from flexos.explore.space import Configuration, Space, load_space
from flexos.hardening import needed_features
from flexos.probe import machine_report

__all__ = ["Exploration", "default_out", "explore", "listing", "refusals", "resume_hint", "settle"]


@dataclass(frozen=True)
class Exploration:
    space: Space
    configs: list[Configuration]
    order: SafetyOrder
    goal: Goal
    answer: Answer
    out: Path
    files: list[Path]  # what was written under ``out`` besides the cache and the generated configs
    runs: int  # benchmark runs made now (the others came from the cache)
    notes: list[str]  # warnings about the space file and the order
    execution: Execution  # the hosts that ran runs, the runs lost with a host, batches against one host


def refusals(space: Space, here: bool = True) -> list[str]:
    """Why some of the space's configurations cannot run: unknown drivers, and with ``here`` (the
    local engine) the drivers and hardening options this machine cannot run. On a cluster the
    hosts decide that: the engine schedules each run where it can run, or refuses it."""
    refused = []
    for driver in space.drivers:
        reason = drivers.unavailable(driver) if here else None
        if reason:
            refused.append(f"{space.source}:{space.drivers_line}: driver {driver!r}: {reason}")
    needed = {
        (toggle, option, feature)
        for toggle, hardening in space.compartment_toggles.items()
        for option, feature in needed_features(hardening)
    }
    if needed and here:
        found = {f.name: f for f in machine_report()}
        for toggle, option, feature in sorted(needed):
            if not found[feature].available:
                refused.append(
                    f"{space.source}: toggle {toggle!r}: {option} needs {feature}, which this machine lacks "
                    f"({found[feature].detail}); remove the toggle or explore on a machine that has it"
                )
    return refused


def explore(
    space_path: str | Path,
    budget: float,
    order_path: str | Path | None = None,
    out: str | Path | None = None,
    exhaustive: bool = False,
    engine: str | Engine | None = None,
    address: str | None = None,
) -> Exploration:
    """Explore ``space_path`` under ``budget``.

    ``engine``: where runs happen: a name (default: the space's, else ``local``; ``ray`` on the
    cluster at ``address``), or an engine made with :func:`make_engine` for this space's benchmark
    and ``out``, which stays open for further explorations (budgets) of the same space. Raises
    ConfigError, DriverUnavailable, BenchmarkFailed or FlexosError (a cluster without hosts).
    """
    space, notes = load_space(space_path)
    configs = space.configurations()
    order = read_order(order_path, space, configs) if order_path else documented_order(configs)
    notes = [*notes, *order.notes]
    goal = Goal(budget, space.benchmark.higher_is_better, space.benchmark.statistic)
    facts = [safety_facts(c) for c in configs]
    out = Path(out) if out is not None else default_out(space.source)
    bench = bench_of(space, out)
    owned = engine is None or isinstance(engine, str)
    if isinstance(engine, str) or engine is None:
        engine = make_engine(engine or space.engine, bench, address or space.address)
    elif engine.bench != bench:
        raise ValueError(f"the engine runs {engine.bench.source}'s benchmark into another output, not {space.source}'s")
    refused = refusals(space, here=isinstance(engine, LocalEngine))
    if refused:
        if owned:
            engine.close()
        raise DriverUnavailable("\n".join(refused))
    out.mkdir(parents=True, exist_ok=True)
    try:
        runner = Runner(space, configs, out, engine)
        state = Search(order, goal, facts, exhaustive)
        with runner.progress(len(configs)) as bar:
            if exhaustive:  # in rounds: every configuration's first run, then every second run, ...
                for run in range(space.benchmark.repeats):
                    start = run * len(configs) // space.benchmark.repeats  # each round starts elsewhere
                    runner.measure_many([*range(start, len(configs)), *range(start)], run + 1)
            settle(state, runner, lambda: bar.update(state.resolved - bar.n))
    finally:
        if owned:
            engine.close()
    answer = state.answer()
    sequential = None
    if answer.batches < len(answer.measured) and not exhaustive:
        sequential = sequential_count(order, goal, facts, answer)
    execution = report.Execution(runner.hosts, runner.lost, sequential)
    paths = {i: runner.config_path(i) for i in answer.measured}
    ran_on = {i: runner.hosts_of(i) for i in answer.measured}
    records = report.rows(configs, answer, paths, ran_on)
    files = [out / "results.csv", out / "results.json", out / "performance.svg"]
    report.write_csv(files[0], records)
    summary = report.summary(space, configs, order, goal, answer, execution)
    report.write_json(files[1], summary, records)
    report.performance_figure(files[2], space, configs, goal, answer)
    if report.poset_figure(out / "poset.svg", configs, order, goal, answer):
        files.append(out / "poset.svg")
    else:
        notes.append(f"poset.svg not drawn: more than {report.MAX_POSET_NODES} configurations")
    return Exploration(space, configs, order, goal, answer, out, files, runner.runs_done, notes, execution)


def settle(state: Search, runner: Runner, progress: Callable[[], object] = lambda: None) -> Answer:
    """Measure what ``state`` proposes, as many configurations at once as the runner's engine has
    hosts, until the answer is settled; ``progress`` is called after each batch."""
    while proposed := state.propose(max(runner.engine.hosts(), 1)):  # no host left: the engine says so
        for index, outcome in runner.measure_many(proposed).items():
            if isinstance(outcome, BenchmarkFailed):
                state.record_failure(index, outcome.reason)
            else:
                state.record(index, outcome)
        progress()
    return state.answer()


def default_out(space_path: Path) -> Path:
    """``DIR/STEM.explore`` beside the space file."""
    return space_path.parent / f"{space_path.stem}.explore"


def listing(space: Space) -> list[str]:
    """What ``flexos explore --list`` prints: each configuration's name and layout."""
    configs = space.configurations()
    width = max(len(c.name) for c in configs)
    return [
        f"{len(configs)} configurations in {space.source}:",
        *(f"  {config.name:<{width}}  {report.describe(config)}" for config in configs),
    ]


def resume_hint(out: Path) -> str:
    """How many runs a stopped exploration keeps in ``out``, and how to go on."""
    return f"{cached_runs(out)} runs are cached in {out / 'cache.jsonl'}; run the same command again to resume."
