"""A run's gate statistics, per compartment (``flexos run --stats``, :meth:`Runtime.stats`).

The gates count (:mod:`flexos.gates.stats`); this gathers their counts with what the runtime
knows (each compartment's driver, starts and restarts, the proxies its link holds now) into plain
data, and renders it: a table for a person, a dict for JSON whose shape :data:`SCHEMA` versions.

flexos's own crossings (``TargetStats.flexos``: its state module and class descriptions) are in
every total, and in the JSON's target lists with ``"flexos": true``; the table's hottest lists
leave them out, so that they show the app's calls, and sums them up on a line of their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from flexos.gates import stats as gate_stats
from flexos.gates.stats import GateStats, TargetStats

if TYPE_CHECKING:
    from flexos.runtime.compartment import Compartment

SCHEMA = 1  # bumped when a key of the JSON changes meaning or goes away
HOTTEST = 5  # targets the table shows per compartment (the JSON has them all)


@dataclass
class CompartmentStats:
    """One compartment as the app's gates saw it."""

    name: str
    driver: str
    starts: int
    restarts: int
    start_seconds: float  # booting it, every start together (outside the calls' time)
    calls: int  # the app's calls into it
    seconds: float  # the app's wall time waiting on it (calls nested in another gate call not added)
    share: float  # of the run's wall time
    callbacks: int  # its calls back into the app
    callback_seconds: float
    sent_bytes: int  # frames the app sent it (its calls, and replies to its callbacks)
    received_bytes: int
    proxies: int  # the app's live proxies of its objects (now, or when the runtime stopped)
    lent: int  # the app's objects it holds (classes included)
    targets: list[TargetStats] = field(default_factory=list)
    callback_targets: list[TargetStats] = field(default_factory=list)


@dataclass
class RunStats:
    """A run's gate statistics. ``seconds`` and ``start_seconds`` against ``wall_seconds`` are the
    measured counterpart of what ``flexos trace`` predicts a proposal adds (where the prediction
    counts only the gates' own cost, ``seconds`` includes the compartments' work too)."""

    wall_seconds: float  # since the runtime booted
    seconds: float  # in gates, every compartment, summed over the app's threads
    share: float
    start_seconds: float  # starting compartments, every start together
    compartments: list[CompartmentStats]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}


def collect(compartments: dict[str, Compartment], wall_seconds: float) -> RunStats:
    """The counts so far for the compartments this runtime boots."""
    counted = gate_stats.snapshot()
    wall = max(wall_seconds, 1e-9)
    rows = []
    for name, compartment in compartments.items():
        if compartment.driver is None:
            continue
        gates = counted.get(name, GateStats())
        link = compartment.current_link
        rows.append(
            CompartmentStats(
                name,
                compartment.driver.name,
                compartment.starts,
                compartment.restarts,
                compartment.start_seconds,
                gates.calls,
                gates.seconds,
                gates.seconds / wall,
                gates.callbacks,
                gates.callback_seconds,
                gates.sent_bytes,
                gates.received_bytes,
                len(link.imports) if link is not None else 0,
                len(link.exports) if link is not None else 0,
                gates.targets,
                gates.callback_targets,
            )
        )
    seconds = sum(row.seconds for row in rows)
    return RunStats(wall_seconds, seconds, seconds / wall, sum(row.start_seconds for row in rows), rows)


def _size(count: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def table(run: RunStats) -> str:
    """The statistics as a person reads them (``flexos run --stats`` prints it to stderr)."""
    lines = [
        f"flexos stats: {_ms(run.wall_seconds)} wall since boot; {_ms(run.seconds)} ({run.share:.1%}) of it in gates "
        f"(the compartments' work included), {_ms(run.start_seconds)} starting compartments"
    ]
    header = (
        f"  {'compartment':<16} {'driver':<9} {'starts':>6} {'restarts':>8} {'start':>9} {'calls':>8} {'in gates':>11}"
        f" {'share':>6}"
        f" {'sent':>10} {'received':>10} {'callbacks':>9} {'proxies':>7} {'lent':>5}"
    )
    lines.append(header)
    for row in run.compartments:
        lines.append(
            f"  {row.name:<16} {row.driver:<9} {row.starts:>6} {row.restarts:>8} {_ms(row.start_seconds):>9}"
            f" {row.calls:>8} {_ms(row.seconds):>11}"
            f" {row.share:>6.1%} {_size(row.sent_bytes):>10} {_size(row.received_bytes):>10} {row.callbacks:>9}"
            f" {row.proxies:>7} {row.lent:>5}"
        )
    for row in run.compartments:
        for title, every in (("hottest calls into", row.targets), ("hottest callbacks from", row.callback_targets)):
            targets = [target for target in every if not target.flexos]
            if not targets:
                continue
            lines.append(f"  {title} {row.name} (calls, time, sent, received):")
            for target in targets[:HOTTEST]:
                lines.append(
                    f"    {target.calls:>8} {_ms(target.seconds):>11} {_size(target.sent_bytes):>10}"
                    f" {_size(target.received_bytes):>10}  {target.target}"
                )
            if len(targets) > HOTTEST:
                lines.append(f"    ... {len(targets) - HOTTEST} more (--stats-json has them all)")
        own = [target for target in (*row.targets, *row.callback_targets) if target.flexos]
        if own:
            lines.append(
                f"  flexos's own crossings with {row.name} (its state module, class descriptions; in the totals above):"
                f" {sum(target.calls for target in own)} calls, {_ms(sum(target.seconds for target in own))},"
                f" {_size(sum(target.sent_bytes for target in own))} sent,"
                f" {_size(sum(target.received_bytes for target in own))} received"
            )
    return "\n".join(lines)


def to_json(run: RunStats) -> str:
    import json  # here: a compartment, which loads the runtime, never needs it

    return json.dumps(run.to_dict(), indent=1)
