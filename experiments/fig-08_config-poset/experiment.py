"""FlexOS figure 8, on Python: the poset of kv's configurations, with the stars for a budget.

The budget is a stated fraction of kv's throughput without isolation (``P1L1B1_f`` in fig-06),
as FlexOS's 500k req/s was of Redis's ~1.2M. ``flexos explore`` answers it from fig-06's own
cache (a copy), so nothing is measured again: once over every configuration (``--exhaustive``:
the stars of all of fig-06's data), once as its monotone search would have (how many
configurations it needs to measure, and whether it finds the same stars).
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from experiments.common.perm import NO_ISOLATION, explored, explored_space, fig06_out, fig06_runs
from experiments.common.steps import Context, main
from experiments.common.tables import print_table, read_csv, write_csv
from flexos.explore import Exploration, explore, report
from flexos.explore.runner import CACHE

FOLDER = Path(__file__).resolve().parent
# The budget, as a fraction of kv's median throughput without isolation.
FRACTION = 0.6
MODES = {"exhaustive": True, "search": False}  # -> explore's --exhaustive


def answer(context: Context, budget: float, mode: str) -> Exploration:
    """kv's space under ``budget`` from the copy of fig-06's cache in ``OUT/kv-MODE.explore``."""
    out = context.out / f"kv-{mode}.explore"
    if not (out / CACHE).exists():
        raise SystemExit(f"{out / CACHE} is missing: run the run step first (make run)")
    return explore(explored_space(context, "kv").source, budget, out=out, exhaustive=MODES[mode])


def prepare(context: Context) -> None:
    out = fig06_out(context)
    found = (explored(out, "kv") / CACHE).exists()
    print(f"  fig-06's kv cache: {explored(out, 'kv') / CACHE} " + ("found" if found else "missing: run runs fig-06"))


def run(context: Context) -> None:
    runs = [float(r["rps"]) for r in fig06_runs(context) if r["app"] == "kv" and r["config"] == NO_ISOLATION]
    if not runs:
        raise SystemExit(f"fig-06 has no measurement of kv's {NO_ISOLATION}: the budget is a fraction of it")
    baseline = statistics.median(runs)
    budget = FRACTION * baseline
    rows = []
    for mode in MODES:
        out = context.out / f"kv-{mode}.explore"
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(explored(fig06_out(context), "kv") / CACHE, out / CACHE)
        done = answer(context, budget, mode)
        print(f"  {mode}:\n" + report.table(done.space, done.configs, done.order, done.goal, done.answer))
        if done.runs:
            print(f"  {done.runs} runs were missing from fig-06's cache and were measured now")
        rows.append(
            {
                "mode": mode,
                "fraction": FRACTION,
                "no_isolation_rps": f"{baseline:.0f}",
                "budget_rps": f"{budget:.0f}",
                "stars": " ".join(done.configs[i].name for i in done.answer.stars),
                "measured": len(done.answer.measured),
                "meeting": sum(m.meets for m in done.answer.measured.values()),
                "failed": len(done.answer.failed),
                "inferred": len(done.answer.inferred),
                "configurations": len(done.configs),
                "measured_now": done.runs,
                "confidence": "" if done.answer.confidence is None else f"{done.answer.confidence:.3f}",
            }
        )
    write_csv(context.out / "fig-08_stars.csv", rows)


def plot(context: Context) -> None:
    rows = read_csv(context.out / "fig-08_stars.csv")
    print_table(
        ["mode", "budget req/s", "stars", "measured", "failed", "inferred", "of"],
        [
            [r["mode"], r["budget_rps"], r["stars"], r["measured"], r["failed"], r["inferred"], r["configurations"]]
            for r in rows
        ],
    )
    exhaustive = next(r for r in rows if r["mode"] == "exhaustive")
    search = next(r for r in rows if r["mode"] == "search")
    same = "the same stars" if search["stars"] == exhaustive["stars"] else f"stars {search['stars']}"
    fraction, baseline, budget = (float(exhaustive[k]) for k in ("fraction", "no_isolation_rps", "budget_rps"))
    title = (
        f"kv: budget {fraction:.0%} of {NO_ISOLATION} ({baseline:,.0f} req/s) = {budget:,.0f} req/s\n"
        f"the search alone measures {search['measured']} + {search['failed']} failed of {search['configurations']}"
        f" and finds {same}"
    )
    done = answer(context, budget, "exhaustive")
    for suffix in ("png", "svg"):
        path = context.out / f"fig-08_config-poset.{suffix}"
        if not report.poset_figure(path, done.configs, done.order, done.goal, done.answer, title=title):
            raise SystemExit(f"the poset has more than {report.MAX_POSET_NODES} configurations: not drawn")
        print(f"wrote {path}")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
