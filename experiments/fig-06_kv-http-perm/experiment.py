"""FlexOS figure 6, on Python: kv and http throughput for every configuration of their space.

Each app's space (``kv-space.yaml``, ``http-space.yaml``) places its parser, logic and back end
in at most two compartments beside the app's own, each backed by fcalls, subinterp or process,
each process hardened or not. ``flexos explore --exhaustive`` measures every configuration (in
rounds, so that drift hits all alike) with ``measure.py`` as its benchmark command, and records
the configurations that cannot run with the reason. The figure is FlexOS's: a bar per
configuration, best first, over a grid saying where each component is and how it is isolated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from ruamel.yaml import YAML

from experiments.common.paths import FLEXOS, PYTHON, REPO
from experiments.common.perm import (
    APPS,
    MECHANISMS,
    NO_ISOLATION,
    explored,
    mechanism,
    space_file,
    strongest,
    summarize,
)
from experiments.common.plotting import COLORS, plt, save
from experiments.common.steps import Context, main, require_tools
from experiments.common.tables import print_table, read_csv, write_csv
from flexos.explore import load_space, refusals
from flexos.explore.space import Space

FOLDER = Path(__file__).resolve().parent
# What the smoke space measures per run (full sizes are in the space files).
SMOKE_SIZES = {"kv": "--requests 2000", "http": "--seconds 1"}


def space_path(context: Context, app: str) -> Path:
    """The space explored: the folder's, or (smoke) a copy with one compartment, one run and tiny sizes."""
    path = space_file(context.out, app, context.smoke)
    if context.smoke:
        yaml = YAML()
        document = yaml.load(space_file(context.out, app, smoke=False))
        explore = document["explore"]
        explore["compartments"] = 1
        explore["benchmark"]["repeats"] = 1
        command = f"PYTHONPATH={REPO} {PYTHON} {FOLDER / 'measure.py'} {app} {SMOKE_SIZES[app]}"
        explore["benchmark"]["command"] = command
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as stream:
            yaml.dump(document, stream)
    return path


def prepare(context: Context) -> None:
    require_tools(("redis-benchmark", "redis-tools"), ("wrk", "wrk"))
    for app in APPS:
        space, _ = load_space(space_path(context, app))
        refused = refusals(space)
        count = len(space.configurations())
        print(f"  {app}: {count} configurations; " + ("; ".join(refused) if refused else "every driver runs here"))


def run(context: Context) -> None:
    require_tools(("redis-benchmark", "redis-tools"), ("wrk", "wrk"))
    rows = []
    for app in APPS:
        out = explored(context.out, app)
        shutil.rmtree(out, ignore_errors=True)  # every run measures afresh (fig-08 reuses this cache)
        argv = [FLEXOS, "explore", str(space_path(context, app)), "--budget", "0", "--exhaustive", "--out", str(out)]
        print(f"  load {os.getloadavg()[0]:.1f}; {' '.join(argv)}", flush=True)
        if subprocess.run(argv).returncode != 0:
            raise SystemExit(f"flexos explore failed for {app} (its output is above); run again to resume")
        results = json.loads((out / "results.json").read_text())
        for record in results["results"]:
            base = {"app": app, "config": record["name"], "layout": record["layout"]}
            if record["status"] == "failed":
                rows.append({**base, "run": "", "rps": "", "failed": record["failure"]})
            rows += [{**base, "run": n, "rps": f"{v:.1f}", "failed": ""} for n, v in enumerate(record["runs"])]
        print(f"  load {os.getloadavg()[0]:.1f} after {app}")
    write_csv(context.out / "fig-06_runs.csv", rows)


# Failures in a few words for the figure (the CSV keeps the whole reason): pattern -> label.
SHORT_REASONS = {
    r"module (\w+)\S* does not support loading in subinterpreters": r"\1 refuses subinterpreters",
    r"a subinterp compartment reaches the app's compartment and fcalls": "a subinterp reaches no other compartment",
    r"driver 'subinterp' cannot be connected": "a process cannot reach a subinterp",
    r"'socket\.sendmsg' is denied in compartment": "audit blocks the sibling gate (sendmsg)",
}


def short_reason(reason: str) -> str:
    for pattern, label in SHORT_REASONS.items():
        found = re.search(pattern, reason)
        if found:
            return found.expand(label)
    return reason.rsplit(": ", 1)[-1][:45]


def figure(context: Context, app: str, space: Space, summary: list[dict]) -> None:
    """FlexOS's fig. 6 for one app: bars best first (failed ones last), over the placement grid."""
    configs = {c.name: c for c in space.configurations()}
    measured = sorted((s for s in summary if s["x_no_isolation"]), key=lambda s: -float(s["x_no_isolation"]))
    failed = [s for s in summary if not s["median_rps"]]
    shown = measured + failed
    fig, (bars, grid) = plt.subplots(
        2, 1, figsize=(max(8.0, 0.24 * len(shown) + 2), 6.2), sharex=True, gridspec_kw={"height_ratios": [3.2, 1]}
    )
    values = [float(s["x_no_isolation"]) for s in measured]
    spread = [
        [v - float(s["x_min"]) for v, s in zip(values, measured, strict=True)],
        [float(s["x_max"]) - v for v, s in zip(values, measured, strict=True)],
    ]
    colors = [COLORS[strongest(configs[s["config"]])] for s in measured]
    bars.bar(range(len(measured)), values, yerr=spread, color=colors, ecolor="#333333")
    bars.axhline(1.0, color="black", linewidth=0.8)
    top = max([v + e for v, e in zip(values, spread[1], strict=True)], default=1.0) * 1.05
    for column, s in enumerate(failed, len(measured)):
        bars.bar(column, top, color="none", edgecolor="#999999", hatch="///", linewidth=0.5)
        bars.text(column, top * 0.03, f"failed: {short_reason(s['failed'])}", rotation=90, fontsize=6, va="bottom")
    bars.set_ylim(0, top)
    bars.set_ylabel(f"x {NO_ISOLATION} (no isolation), same round\n(median of rounds, bars: min-max)")
    base = next((s["median_rps"] for s in measured if s["config"] == NO_ISOLATION), "?")
    client = "redis-benchmark -c 30 -k 1 -P 16 -t get,set" if app == "kv" else "wrk -t 2 -c 30, page /"
    bars.set_title(
        f"{app}: {len(measured)} configurations measured, {len(failed)} cannot run (hatched); "
        f"bar colour = its strongest mechanism; {NO_ISOLATION}: {base} req/s\n"
        f"measure.py {space.benchmark.command.split('measure.py ')[-1]} ({client}), "
        f"{space.benchmark.repeats} rounds",
        fontsize=9,
    )
    for column, s in enumerate(shown):
        config = configs[s["config"]]
        for row, component in enumerate(space.components):
            kind = mechanism(config, component.name)
            grid.scatter(column, row, s=70, marker="s", color=COLORS[kind], edgecolors="black", linewidths=0.3)
            grid.text(column, row, str(config.compartment_of(component.name) + 1), ha="center", va="center", fontsize=6)
    grid.set_yticks(range(len(space.components)), [f"{c.name} ({c.short})" for c in space.components], fontsize=8)
    grid.set_ylim(len(space.components) - 0.5, -0.5)
    grid.set_xticks(range(len(shown)), [s["config"] for s in shown], rotation=90, fontsize=6)
    grid.set_xlim(-0.7, len(shown) - 0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[k], label=k) for k in MECHANISMS]
    grid.legend(handles=handles, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.9), frameon=False)
    grid.set_xlabel("square = the component's compartment (its number inside), colour = its mechanism", fontsize=8)
    save(fig, context.out, f"fig-06_kv-http-perm-{app}")


def plot(context: Context) -> None:
    summary = summarize(read_csv(context.out / "fig-06_runs.csv"))
    write_csv(context.out / "fig-06_summary.csv", summary)
    print_table(
        ["app", "configuration", "median req/s", "x no isolation (min-max)", "layout / failure"],
        [
            [
                s["app"],
                s["config"],
                s["median_rps"],
                f"{s['x_no_isolation']} ({s['x_min']}-{s['x_max']})" if s["x_no_isolation"] else "",
                (s["failed"] or s["layout"])[:80],
            ]
            for s in summary
        ],
    )
    for app in APPS:
        space, _ = load_space(space_path(context, app))
        figure(context, app, space, [s for s in summary if s["app"] == app])


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
