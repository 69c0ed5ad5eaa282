"""``flexos explore``: the safest configurations of a space whose performance meets a budget.

The pieces (docs/explore.md): ``space`` reads the ``explore:`` section and enumerates the
configurations; ``order`` orders them by safety; ``search`` decides which to measure and infers
the rest; ``runner`` runs the benchmark command (cached, resumable); ``report`` writes the table,
CSV, JSON and figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexos import drivers
from flexos.errors import DriverUnavailable
from flexos.explore import report
from flexos.explore.order import SafetyOrder, documented_order, read_order, safety_facts
from flexos.explore.runner import BenchmarkFailed, Runner, cached_runs
from flexos.explore.search import Answer, Goal, Search
from flexos.explore.space import Configuration, Space, load_space
from flexos.hardening import needed_features
from flexos.probe import machine_report

__all__ = [
    "BenchmarkFailed",
    "Exploration",
    "default_out",
    "explore",
    "listing",
    "load_space",
    "refusals",
    "report",
    "resume_hint",
]


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


def refusals(space: Space) -> list[str]:
    """Why this machine cannot run some of the space's configurations (drivers, hardening options)."""
    refused = []
    for driver in space.drivers:
        reason = drivers.unavailable(driver)
        if reason:
            refused.append(f"{space.source}:{space.drivers_line}: driver {driver!r}: {reason}")
    needed = {
        (toggle, option, feature)
        for toggle, hardening in space.compartment_toggles.items()
        for option, feature in needed_features(hardening)
    }
    if needed:
        features = {f.name: f for f in machine_report()}
        for toggle, option, feature in sorted(needed):
            if not features[feature].available:
                refused.append(
                    f"{space.source}: toggle {toggle!r}: {option} needs {feature}, which this machine lacks "
                    f"({features[feature].detail}); remove the toggle or explore on a machine that has it"
                )
    return refused


def explore(
    space_path: str | Path,
    budget: float,
    order_path: str | Path | None = None,
    out: str | Path | None = None,
    exhaustive: bool = False,
) -> Exploration:
    """Explore ``space_path`` under ``budget``; raises ConfigError, DriverUnavailable or BenchmarkFailed."""
    space, notes = load_space(space_path)
    refused = refusals(space)
    if refused:
        raise DriverUnavailable("\n".join(refused))
    configs = space.configurations()
    order = read_order(order_path, space, configs) if order_path else documented_order(configs)
    notes = [*notes, *order.notes]
    goal = Goal(budget, space.benchmark.higher_is_better, space.benchmark.statistic)
    out = Path(out) if out is not None else default_out(space.source)
    runner = Runner(space, configs, out)
    state = Search(order, goal, [safety_facts(c) for c in configs], exhaustive)

    def measure(index: int, runs: int | None = None) -> list[float] | BenchmarkFailed:
        """The runs of ``index``, or its failure when failures are recorded (else it is raised)."""
        try:
            return runner.measure(index, runs)
        except BenchmarkFailed as failed:
            if not space.benchmark.record_failures:
                raise
            return failed

    with runner.progress(len(configs)) as bar:
        if exhaustive:  # in rounds: every configuration's first run, then every second run, ...
            for run in range(space.benchmark.repeats):
                start = run * len(configs) // space.benchmark.repeats  # each round starts elsewhere
                for index in [*range(start, len(configs)), *range(start)]:
                    measure(index, run + 1)
        while (index := state.next()) is not None:
            outcome = measure(index)
            if isinstance(outcome, BenchmarkFailed):
                state.record_failure(index, outcome.reason)
            else:
                state.record(index, outcome)
            bar.update(state.resolved - bar.n)
    answer = state.answer()
    paths = {i: runner.config_path(i) for i in answer.measured}
    records = report.rows(configs, answer, paths)
    files = [out / "results.csv", out / "results.json", out / "performance.svg"]
    report.write_csv(files[0], records)
    report.write_json(files[1], report.summary(space, configs, order, goal, answer), records)
    report.performance_figure(files[2], space, configs, goal, answer)
    if report.poset_figure(out / "poset.svg", configs, order, goal, answer):
        files.append(out / "poset.svg")
    else:
        notes.append(f"poset.svg not drawn: more than {report.MAX_POSET_NODES} configurations")
    return Exploration(space, configs, order, goal, answer, out, files, runner.runs_done, notes)


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
