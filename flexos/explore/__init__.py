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
from flexos.explore.engines import make_engine
from flexos.explore.order import SafetyOrder, documented_order, read_order, safety_facts
from flexos.explore.runner import BenchmarkFailed, Runner, bench_of, cached_runs
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
    hosts: dict[str, dict[str, object]]  # each host that ran a run: hostname, CPU, kernel, features
    lost: list[tuple[str, str]]  # (configuration, why) of each run lost with its host and run again


def refusals(space: Space, features: bool = True) -> list[str]:
    """Why this machine cannot run some of the space's configurations (drivers, and with
    ``features`` the hardening options its kernel lacks)."""
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
    if needed and features:
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
    engine: str | None = None,
    address: str | None = None,
) -> Exploration:
    """Explore ``space_path`` under ``budget`` on ``engine`` (default: the space's, else ``local``);
    raises ConfigError, DriverUnavailable, BenchmarkFailed or FlexosError (a cluster without hosts)."""
    space, notes = load_space(space_path)
    engine = engine or space.engine
    address = address or space.address
    # On a cluster the hosts' kernels, not this one, decide what hardening can run (the engine checks).
    refused = refusals(space, features=engine == "local")
    if refused:
        raise DriverUnavailable("\n".join(refused))
    configs = space.configurations()
    order = read_order(order_path, space, configs) if order_path else documented_order(configs)
    notes = [*notes, *order.notes]
    goal = Goal(budget, space.benchmark.higher_is_better, space.benchmark.statistic)
    out = Path(out) if out is not None else default_out(space.source)
    out.mkdir(parents=True, exist_ok=True)
    hosts = make_engine(engine, bench_of(space, out), address)
    try:
        runner = Runner(space, configs, out, hosts)
        state = Search(order, goal, [safety_facts(c) for c in configs], exhaustive)
        with runner.progress(len(configs)) as bar:
            if exhaustive:  # in rounds: every configuration's first run, then every second run, ...
                for run in range(space.benchmark.repeats):
                    start = run * len(configs) // space.benchmark.repeats  # each round starts elsewhere
                    runner.measure_many([*range(start, len(configs)), *range(start)], run + 1)
            while proposed := state.propose(hosts.hosts()):
                for index, outcome in runner.measure_many(proposed).items():
                    if isinstance(outcome, BenchmarkFailed):
                        state.record_failure(index, outcome.reason)
                    else:
                        state.record(index, outcome)
                bar.update(state.resolved - bar.n)
    finally:
        hosts.close()
    answer = state.answer()
    paths = {i: runner.config_path(i) for i in answer.measured}
    ran_on = {i: runner.hosts_of(i) for i in answer.measured}
    records = report.rows(configs, answer, paths, ran_on)
    files = [out / "results.csv", out / "results.json", out / "performance.svg"]
    report.write_csv(files[0], records)
    summary = report.summary(space, configs, order, goal, answer, runner.hosts, runner.lost)
    report.write_json(files[1], summary, records)
    report.performance_figure(files[2], space, configs, goal, answer)
    if report.poset_figure(out / "poset.svg", configs, order, goal, answer):
        files.append(out / "poset.svg")
    else:
        notes.append(f"poset.svg not drawn: more than {report.MAX_POSET_NODES} configurations")
    return Exploration(
        space, configs, order, goal, answer, out, files, runner.runs_done, notes, runner.hosts, runner.lost
    )


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
