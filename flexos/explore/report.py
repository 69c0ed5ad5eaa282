"""What an exploration found: a table, results as CSV and JSON, and two figures.

The figures follow FlexOS (ASPLOS'22): the poset of configurations shaded by performance with the
stars marked (its figure 8), and the performance of each measured configuration with, under each
bar, where every component is and whether it is hardened (its figure 6).
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure  # a Figure without pyplot draws to files only (Agg)

from flexos.explore.order import SafetyOrder
from flexos.explore.search import Answer, Goal
from flexos.explore.space import Configuration, Space

# Above this many configurations the poset figure would be unreadable; it is not drawn.
MAX_POSET_NODES = 600
# Up to this many configurations the poset figure names every node, as FlexOS's figure 8 does.
MAX_NAMED_NODES = 100
_COMPARTMENT_COLORS = ["#7f7f7f", "#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c"]


@dataclass(frozen=True)
class Execution:
    """Where an exploration's runs happened, for the report."""

    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)  # each host that ran a run -> what it is
    lost: Sequence[tuple[str, str]] = ()  # (configuration, why) of each run lost with its host
    # With batches: how many the search measures one at a time on the same runs, and whether exactly
    sequential: tuple[int, bool] | None = None


def describe(config: Configuration) -> str:
    """``c1 process [Env]: redis[H] newlib | c2 process: lwip``."""
    parts = []
    for number, compartment in enumerate(config.compartments, 1):
        toggles = f" [{' '.join(sorted(compartment.hardening))}]" if compartment.hardening else ""
        members = " ".join(
            name + "".join(f"[{t}]" for c, t in sorted(config.library_hardening) if c == name)
            for name in compartment.components
        )
        parts.append(f"c{number} {compartment.driver}{toggles}: {members}")
    return " | ".join(parts)


def rows(
    configs: Sequence[Configuration],
    answer: Answer,
    paths: dict[int, Path],
    hosts: dict[int, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """One record per configuration, in enumeration order; ``hosts``: where each run of it ran."""
    stars = set(answer.stars)
    records = []
    for i, config in enumerate(configs):
        measured = answer.measured.get(i)
        failed = answer.failed.get(i)
        records.append(
            {
                "name": config.name,
                "layout": describe(config),
                "status": "measured" if measured else "failed" if failed is not None else "inferred",
                "meets_budget": measured.meets if measured else False if failed is not None else answer.inferred[i],
                "star": i in stars,
                "value": measured.value if measured else None,
                "runs": list(measured.values) if measured else [],
                "certainty": measured.certainty if measured else None,
                "config": str(paths[i]) if i in paths else None,
                "failure": failed,
                "hosts": (hosts or {}).get(i, []),
            }
        )
    return records


def summary(
    space: Space,
    configs: Sequence[Configuration],
    order: SafetyOrder,
    goal: Goal,
    answer: Answer,
    execution: Execution = Execution(),
) -> dict[str, Any]:
    """The exploration's summary."""
    total = len(order)
    sequential = execution.sequential
    return {
        "space": str(space.source),
        "command": space.benchmark.command,
        "budget": goal.budget,
        "better": "higher" if goal.higher_is_better else "lower",
        "statistic": goal.statistic,
        "order": order.source,
        "exhaustive": answer.exhaustive,
        "configurations": total,
        "measured": len(answer.measured),
        "inferred": len(answer.inferred),
        "failed": len(answer.failed),
        "measured_fraction": len(answer.measured) / total,
        "stars": [configs[i].name for i in answer.stars],
        "confidence": answer.confidence,
        "inference_confidence": answer.inference_confidence,
        "certificate": len(answer.certificate),
        "batches": answer.batches,
        "sequential_measured": sequential[0] if sequential else len(answer.measured),
        "sequential_exact": sequential[1] if sequential else True,
        "contradicted": [configs[i].name for i in answer.contradicted],
        "hosts": execution.hosts,
        "lost": [{"configuration": name, "why": why} for name, why in execution.lost],
        "verified": len(answer.verified),
        "violations": len(answer.violations),
        "compared_pairs": answer.compared,
        "edge_violations": answer.edge_violations,
        "edges_compared": answer.edges_compared,
    }


def table(
    space: Space,
    configs: Sequence[Configuration],
    order: SafetyOrder,
    goal: Goal,
    answer: Answer,
    execution: Execution = Execution(),
) -> str:
    """The terminal report: the stars, then how the answer was reached and how sure it is."""
    total = len(order)
    better = "at least" if goal.higher_is_better else "at most"
    lines = [f"budget: {better} {goal.budget:g} ({goal.statistic} of {space.benchmark.repeats} runs)"]
    if answer.stars:
        lines.append(f"safest configurations meeting it ({len(answer.stars)}):")
        width = max(len(configs[i].name) for i in answer.stars)
        for i in answer.stars:
            star = answer.measured[i]
            sure = f"  certainty {star.certainty:.3f}" if star.certainty is not None else ""
            lines.append(f"  * {configs[i].name:<{width}}  {star.value:>12.6g}{sure}  {describe(configs[i])}")
    else:
        lines.append("no configuration meets it")
    count = len(answer.measured)
    lines.append(
        f"measured {count} of {total} configurations ({count / total:.1%}), inferred {len(answer.inferred)}"
        + (" (exhaustive)" if answer.exhaustive else "")
        + f"; order: {order.source}"
    )
    if execution.sequential is not None:
        count, exact = execution.sequential
        lines.append(
            f"in {answer.batches} batches, one configuration per host at a time; one host would have measured "
            f"{'' if exact else 'at least '}{count}, one per batch"
        )
    hosts = execution.hosts
    if len(hosts) > 1:
        kinds: dict[str, int] = {}
        for host in hosts.values():
            kinds[host_kind(host)] = kinds.get(host_kind(host), 0) + 1
        lines.append(f"on {len(hosts)} hosts: " + "; ".join(f"{n} x {kind}" for kind, n in kinds.items()))
    if execution.lost:
        lost = ", ".join(name for name, _ in execution.lost)
        lines.append(f"lost {len(execution.lost)} runs with their host, run again elsewhere: {lost}")
    if answer.failed:
        lines.append(f"failed {len(answer.failed)} (could not run; never stars):")
        by_reason: dict[str, list[str]] = {}
        for i, reason in answer.failed.items():
            by_reason.setdefault(reason, []).append(configs[i].name)
        for reason, names in by_reason.items():
            lines.append(f"  {len(names)}: {' '.join(names)}: {reason}")
    if answer.confidence is not None:
        below = 0
        for index in answer.stars:
            below |= order.below[index]
        misses = [i for i in answer.measured if i not in answer.stars and not below >> i & 1]
        inferred = [i for i, meets in answer.inferred.items() if not meets and not below >> i & 1]
        lines.append(
            f"confidence {answer.confidence:.3f}: that every star meets the budget and every configuration not "
            f"below one misses it ({len(misses)} measured misses, by their certainty; {len(inferred)} inferred, "
            f"{answer.inference_confidence:.3f} by the model)"
        )
    else:
        lines.append("confidence unknown: one run per configuration; set benchmark.repeats to 2 or more")
    if answer.verified:
        lines.append(
            f"verified {len(answer.verified)} inferred configurations by measuring them (stars' safer neighbours, "
            "doubtful inferences)"
        )
    if answer.contradicted:
        lines.append(
            f"not used to infer: {len(answer.contradicted)} measurements for which a measured pair shows the order "
            "does not hold"
        )
    lines.append(
        f"monotonicity: the safer of two measured configurations did better in {len(answer.violations)} of "
        f"{answer.compared} compared pairs ({answer.edge_violations} of {answer.edges_compared} direct neighbours)"
    )
    return "\n".join(lines)


def host_kind(host: dict[str, Any]) -> str:
    """What makes results of two hosts comparable (their hardware and software, not their names)."""
    features = " ".join(name for name, available in sorted(host.get("features", {}).items()) if available)
    return (
        f"{host.get('cpu')}, kernel {host.get('kernel')}, Python {host.get('python')}, flexos {host.get('flexos')}, "
        f"drivers {' '.join(host.get('drivers', ()))}, features {features or 'none'}"
    )


def write_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow(
                {**record, "runs": " ".join(f"{v:g}" for v in record["runs"]), "hosts": " ".join(record["hosts"])}
            )


def write_json(path: Path, summary_data: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    path.write_text(json.dumps({**summary_data, "results": list(records)}, indent=2) + "\n")


# -- figures ----------------------------------------------------------------------------------------
def poset_figure(
    path: Path,
    configs: Sequence[Configuration],
    order: SafetyOrder,
    goal: Goal,
    answer: Answer,
    title: str | None = None,
) -> bool:
    """The Hasse diagram, safer upwards, nodes shaded by performance (darker = better), stars in red.

    ``title`` goes above the legend line. Returns False (and draws nothing) past MAX_POSET_NODES
    configurations.
    """
    if len(configs) > MAX_POSET_NODES:
        return False
    graph = order.graph()
    level = order.levels()
    rows_at: dict[int, list[int]] = {}
    for i in range(len(configs)):
        rows_at.setdefault(level[i], []).append(i)
    x: dict[int, float] = {}
    for height in sorted(rows_at):
        nodes = rows_at[height]
        # Barycenter of the configurations below, to keep edges short; then spread evenly.
        nodes.sort(key=lambda i: statistics.fmean([x[p] for p in graph.predecessors(i)] or [0.0]))
        for slot, i in enumerate(nodes):
            x[i] = slot - (len(nodes) - 1) / 2
    values = [m.value for m in answer.measured.values()]
    shade = Normalize(min(values), max(values)) if values else Normalize(0, 1)
    # Darker = better; the worst measured value is light grey, not white: no filled node looks hollow.
    steps = [0.15 + 0.85 * k / 255 for k in range(256)]
    cmap = ListedColormap(colormaps["Greys"](steps if goal.higher_is_better else steps[::-1]))
    widest = max(len(r) for r in rows_at.values())
    named = len(configs) <= MAX_NAMED_NODES
    figure = Figure(figsize=(max(6.0, widest * (0.75 if named else 0.35)), max(4.0, len(rows_at) * 1.1)))
    axes = figure.subplots()
    for lower, upper in graph.edges:
        axes.plot([x[lower], x[upper]], [level[lower], level[upper]], color="#999999", linewidth=0.6, zorder=1)
    stars = set(answer.stars)
    for i in range(len(configs)):
        measured = answer.measured.get(i)
        if i in stars and measured is not None:  # a star is always measured
            color = cmap(shade(measured.value))
            axes.scatter(x[i], level[i], s=320, marker="*", color=color, edgecolors="red", linewidths=1.8, zorder=3)
        elif measured is not None:
            axes.scatter(x[i], level[i], s=90, color=cmap(shade(measured.value)), edgecolors="black", zorder=2)
        elif i in answer.failed:
            axes.scatter(x[i], level[i], s=60, marker="x", color="#c44e52", zorder=2)
        else:
            style = "solid" if answer.inferred[i] else "dotted"
            axes.scatter(x[i], level[i], s=60, facecolors="none", edgecolors="#555555", linestyles=style, zorder=2)
        if named:
            axes.annotate(
                configs[i].name,
                (x[i], level[i]),
                xytext=(0, -12 if i in stars else -9),
                textcoords="offset points",
                ha="center",
                fontsize=5,
            )
    mapped = ScalarMappable(norm=shade, cmap=cmap)
    figure.colorbar(mapped, ax=axes, label=f"measured value ({goal.statistic})", shrink=0.7)
    axes.set_yticks(sorted(rows_at))
    axes.set_ylabel("safety level (longest chain below)")
    axes.set_xticks([])
    failed = f", {len(answer.failed)} failed (x)" if answer.failed else ""
    axes.set_title(
        (f"{title}\n" if title else "")
        + f"{len(configs)} configurations, {len(answer.measured)} measured (filled){failed}, others inferred\n"
        f"(hollow: solid meets, dotted misses); stars: safest meeting {goal.budget:g}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path)
    return True


def performance_figure(path: Path, space: Space, configs: Sequence[Configuration], goal: Goal, answer: Answer) -> None:
    """Bars of the measured configurations (best first) over a grid: each component's compartment
    (colour) and hardening (filled = hardened), as FlexOS's figure 6."""
    measured = sorted(answer.measured, key=lambda i: answer.measured[i].value, reverse=goal.higher_is_better)
    shown = measured + sorted(answer.failed)  # failed ones last, marked x on the axis
    stars = set(answer.stars)
    width = max(6.0, len(shown) * 0.3)
    height_ratios = [3, max(1, len(space.components)) * 0.35]
    figure = Figure(figsize=(width, 5))
    bars, grid = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": height_ratios})
    spread = [
        statistics.stdev(answer.measured[i].values) if len(answer.measured[i].values) > 1 else 0 for i in measured
    ]
    bars.bar(
        range(len(measured)),
        [answer.measured[i].value for i in measured],
        yerr=spread,
        color=["#c44e52" if i in stars else "#8c8c8c" for i in measured],
        edgecolor="black",
        linewidth=0.4,
    )
    if answer.failed:
        failed = range(len(measured), len(shown))
        bars.scatter(failed, [0] * len(failed), marker="x", color="#c44e52", clip_on=False, zorder=3, label="failed")
    bars.axhline(goal.budget, color="black", linestyle="--", linewidth=1, label=f"budget {goal.budget:g}")
    bars.set_ylabel(f"metric ({goal.statistic}, {'higher' if goal.higher_is_better else 'lower'} is better)")
    bars.legend(loc="upper right", fontsize=8)
    inferred = len(configs) - len(shown)
    bars.set_title(
        f"{len(measured)} measured configurations (stars in red)"
        + (f"; {len(answer.failed)} failed (x)" if answer.failed else "")
        + (f"; {inferred} inferred, not shown" if inferred else ""),
        fontsize=9,
    )
    for column, i in enumerate(shown):
        config = configs[i]
        for row, component in enumerate(space.components):
            number = config.compartment_of(component.name)
            compartment = config.compartments[number]
            hardened = bool(compartment.hardening) or any(c == component.name for c, _ in config.library_hardening)
            color = _COMPARTMENT_COLORS[number % len(_COMPARTMENT_COLORS)]
            grid.scatter(column, row, s=50, facecolors=color if hardened else "none", edgecolors=color, linewidths=1.2)
    grid.set_yticks(range(len(space.components)), [c.name for c in space.components], fontsize=8)
    grid.set_ylim(-0.6, len(space.components) - 0.4)
    grid.invert_yaxis()
    grid.set_xticks(range(len(shown)), [configs[i].name for i in shown], rotation=90, fontsize=6)
    grid.set_xlabel("colour = compartment (c1 grey, c2 blue, c3 red, ...); filled = hardened")
    figure.tight_layout()
    figure.savefig(path)
