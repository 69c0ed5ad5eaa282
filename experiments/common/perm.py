"""fig-06's measurements of kv and http over their configuration spaces, as fig-06, 07 and 08 read them.

fig-06 runs ``flexos explore --exhaustive`` on each app's space and writes one row per run into
``fig-06_runs.csv``; fig-07 and fig-08 are drawn from those runs (fig-08 also from explore's own
cache), so they find fig-06's output here and run fig-06 first when it is missing.
"""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

from experiments.common.paths import PYTHON, REPO
from experiments.common.steps import Context
from experiments.common.tables import read_csv
from flexos.explore import load_space
from flexos.explore.runner import CACHE
from flexos.explore.space import Configuration, Space

FIG06 = REPO / "experiments" / "fig-06_kv-http-perm"
APPS = ("kv", "http")
# The configuration without any boundary: every component in the app's own process (fcalls
# imports them plainly, so this runs the same code as no flexos); ratios are to it.
NO_ISOLATION = "P1L1B1_f"
# Mechanisms from weakest to strongest, as the figures name and colour them.
MECHANISMS = ("fcalls", "subinterp", "process", "process-hardened")


def fig06_out(context: Context) -> Path:
    """Where fig-06's results are: ``$FIG06_OUT``, else its ``plots/`` (``plots-smoke/`` for smoke)."""
    chosen = os.environ.get("FIG06_OUT")
    return Path(chosen).resolve() if chosen else FIG06 / ("plots-smoke" if context.smoke else "plots")


def fig06_runs(context: Context) -> list[dict[str, str]]:
    """fig-06's rows, running fig-06 first (same size) if its runs or explore's caches are missing."""
    out = fig06_out(context)
    missing = [p for p in [out / "fig-06_runs.csv", *(explored(out, app) / CACHE for app in APPS)] if not p.exists()]
    if missing:
        print(f"  {missing[0]} is missing: running fig-06 first", flush=True)
        argv = [PYTHON, str(FIG06 / "experiment.py"), "run", "--out", str(out), *(["--smoke"] if context.smoke else [])]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if subprocess.run(argv, env=env).returncode != 0:
            raise SystemExit(f"fig-06 failed (its output is above); run it with: make -C {FIG06} run")
    return read_csv(out / "fig-06_runs.csv")


def explored(out: Path, app: str) -> Path:
    """Where ``flexos explore`` wrote an app's results and its cache, under fig-06's output ``out``."""
    return out / f"{app}.explore"


def space_file(out: Path, app: str, smoke: bool) -> Path:
    """The space fig-06 explores for ``app``: the folder's, or (smoke) its small copy in fig-06's output ``out``."""
    return out / "smoke-spaces" / f"{app}-space.yaml" if smoke else FIG06 / f"{app}-space.yaml"


def explored_space(context: Context, app: str) -> Space:
    """The space fig-06 explored for ``app``."""
    return load_space(space_file(fig06_out(context), app, context.smoke))[0]


def mechanism(config: Configuration, component: str) -> str:
    """How the compartment holding ``component`` is isolated (one of MECHANISMS)."""
    compartment = config.compartments[config.compartment_of(component)]
    if compartment.driver == "process" and compartment.hardening:
        return "process-hardened"
    return compartment.driver


def strongest(config: Configuration) -> str:
    """The strongest mechanism any of the configuration's compartments uses."""
    return max((mechanism(config, name) for c in config.compartments for name in c.components), key=MECHANISMS.index)


def summarize(rows: list[dict[str, str]]) -> list[dict]:
    """Per app and configuration: the median requests per second and its ratio to no isolation, or the failure.

    fig-06's exploration takes run ``r`` of every configuration in round ``r``, so each run is
    divided by no isolation's run of the same round (the machine drifts between rounds), and the
    ratio is the median of those.
    """
    runs: dict[tuple[str, str], dict[int, float]] = {}
    failures: dict[tuple[str, str], str] = {}
    layouts: dict[tuple[str, str], str] = {}
    for row in rows:
        key = (row["app"], row["config"])
        layouts[key] = row["layout"]
        if row["failed"]:
            failures[key] = row["failed"]
        else:
            runs.setdefault(key, {})[int(row["run"])] = float(row["rps"])
    summary = []
    for key, layout in layouts.items():
        values = runs.get(key, {})
        base = runs.get((key[0], NO_ISOLATION), {})
        ratios = [value / base[run] for run, value in values.items() if run in base]
        summary.append(
            {
                "app": key[0],
                "config": key[1],
                "layout": layout,
                "median_rps": f"{statistics.median(values.values()):.0f}" if values else "",
                "x_no_isolation": f"{statistics.median(ratios):.2f}" if ratios else "",
                "x_min": f"{min(ratios):.2f}" if ratios else "",
                "x_max": f"{max(ratios):.2f}" if ratios else "",
                "failed": failures.get(key, ""),
            }
        )
    return summary
