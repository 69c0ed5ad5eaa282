"""FlexOS figure 10, on Python: 5000 SQLite INSERTs (one transaction each, DB on tmpfs) per mechanism.

Each run is a fresh ``python -m sqlbench`` (apps/sqlite), plain or under one of its flexos
configurations; the configurations alternate over the rounds. The result is the median time of
the INSERT loop, and its ratio to no flexos, beside FlexOS's own ratios to its own baseline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from experiments.common import paper
from experiments.common.apps import Variant, mechanism_variants, refusal, rotated, run_to_end, usable_variants
from experiments.common.plotting import COLORS, plt, save, wrap
from experiments.common.steps import Context, main
from experiments.common.tables import median_by, print_table, read_csv, write_csv

FOLDER = Path(__file__).resolve().parent
APP = "sqlite"
VARIANTS = mechanism_variants("fcalls", "subinterp", "process", "process-hardened")
TARGETS = {"process": 1.3, "subinterp": 1.2}  # at most this many times no flexos
TMPFS = Path("/dev/shm")


def sizes(context: Context) -> tuple[int, int]:
    """(INSERTs per run, rounds)."""
    return (200, 1) if context.smoke else (5000, 5)


def prepare(context: Context) -> None:
    if not TMPFS.is_dir():
        raise SystemExit(f"{TMPFS} is missing: this experiment keeps the database on tmpfs, as FlexOS did")
    for variant in VARIANTS:
        reason = refusal(APP, variant)
        print(f"  {variant.label:<22} {'ok' if reason is None else 'SKIPPED: ' + reason}")


def run(context: Context) -> None:
    inserts, rounds = sizes(context)
    usable, skipped = usable_variants(APP, VARIANTS)
    rows = [
        _row(variant, None, inserts, skipped=skipped[variant.key]) for variant in VARIANTS if variant.key in skipped
    ]
    workdir = Path(tempfile.mkdtemp(prefix="fig10-", dir=TMPFS))
    try:
        for r in range(rounds):
            for variant in rotated(usable, r):
                try:
                    lines = run_to_end(APP, variant, ["--inserts", str(inserts)], workdir / variant.key, timeout=900)
                    result = json.loads(lines[-1])
                    rows.append(_row(variant, r, inserts, seconds=result["seconds"]))
                    print(f"  round {r} {variant.label:<22} {result['seconds']:.3f} s")
                except RuntimeError as exc:
                    print(f"  round {r} {variant.label:<22} FAILED: {exc}")
                    rows.append(_row(variant, r, inserts, failed=str(exc).splitlines()[-1]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_csv(context.out / "fig-10_runs.csv", rows)


def _row(variant: Variant, round_: int | None, inserts: int, seconds: float | None = None, **note: str) -> dict:
    return {
        "config": variant.key,
        "label": variant.label,
        "round": "" if round_ is None else round_,
        "inserts": inserts,
        "seconds": "" if seconds is None else f"{seconds:.6f}",
        "skipped": note.get("skipped", ""),
        "failed": note.get("failed", ""),
        "load": f"{os.getloadavg()[0]:.2f}",
    }


def summarize(rows: list[dict[str, str]]) -> list[dict]:
    medians = median_by(rows, ("config",), "seconds")
    baseline = medians.get(("none",))
    summary = []
    for variant in VARIANTS:
        median = medians.get((variant.key,))
        notes = {row["skipped"] or row["failed"] for row in rows if row["config"] == variant.key} - {""}
        ratio = median / baseline if median is not None and baseline else None
        target = TARGETS.get(variant.key)
        summary.append(
            {
                "config": variant.key,
                "label": variant.label,
                "median_s": "" if median is None else f"{median:.4f}",
                "x_no_flexos": "" if ratio is None else f"{ratio:.2f}",
                "target": "" if target is None else f"<= {target}",
                "met": "" if target is None or ratio is None else ("yes" if ratio <= target else "no"),
                "note": "; ".join(sorted(notes)),
            }
        )
    return summary


def plot(context: Context) -> None:
    summary = summarize(read_csv(context.out / "fig-10_runs.csv"))
    write_csv(context.out / "fig-10_summary.csv", summary)
    print_table(
        ["configuration", "median s", "x no flexos", "target", "met", "note"],
        [[s["label"], s["median_s"], s["x_no_flexos"], s["target"], s["met"], s["note"][:60]] for s in summary],
    )
    measured = [s for s in summary if s["median_s"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.3]})
    kinds = {variant.key: variant.kind for variant in VARIANTS}
    bars = left.bar(
        [s["label"] for s in measured],
        [float(s["median_s"]) for s in measured],
        color=[COLORS[kinds[s["config"]]] for s in measured],
    )
    left.bar_label(bars, fmt="%.3f")
    left.set_ylabel(f"time for {read_csv(context.out / 'fig-10_runs.csv')[0]['inserts']} INSERTs (s)")
    left.set_title("flexos (Python, this machine)")
    left.tick_params(axis="x", rotation=25)

    labels = [f"flexos\n{wrap(s['label'])}" for s in measured] + [f"FlexOS\n{name}" for name, _ in paper.SQLITE_RATIOS]
    ratios = [float(s["x_no_flexos"]) for s in measured] + [ratio for _, ratio in paper.SQLITE_RATIOS]
    colors = [COLORS[kinds[s["config"]]] for s in measured] + [COLORS["flexos-paper"]] * len(paper.SQLITE_RATIOS)
    bars = right.bar(labels, ratios, color=colors)
    right.bar_label(bars, fmt="%.2fx")
    right.axhline(1.0, color="black", linewidth=0.8)
    right.axvline(len(measured) - 0.5, color="grey", linestyle=":")  # flexos | FlexOS
    right.set_ylabel("x its own no-isolation baseline")
    right.set_title("ratios: flexos vs FlexOS (ASPLOS'22 fig. 10)")
    right.tick_params(axis="x", labelsize=8)
    figure.suptitle("SQLite INSERTs, one transaction each, database on a RAM filesystem")
    save(figure, context.out, "fig-10_sqlite-exec-time")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
