"""FlexOS figure 7, on Python: kv vs http, each normalized to its own configuration without isolation.

The two spaces of fig-06 name their components by role (parser P, logic L, back end B), so a
configuration name places the same roles in the same compartments with the same mechanisms in
both apps. For each, the ratio to the app's own no-isolation configuration (``P1L1B1_f``) is
drawn side by side, and as FlexOS drew it: one point per configuration, kv across, http up.
Nothing is measured here: fig-06's runs are read (and fig-06 is run first when they are missing).
"""

from __future__ import annotations

from pathlib import Path

from experiments.common.perm import (
    MECHANISMS,
    NO_ISOLATION,
    explored_space,
    fig06_out,
    fig06_runs,
    strongest,
    summarize,
)
from experiments.common.plotting import COLORS, plt, save
from experiments.common.steps import Context, main
from experiments.common.tables import print_table, read_csv, write_csv

FOLDER = Path(__file__).resolve().parent
APP_COLORS = {"kv": "#4c72b0", "http": "#dd8452"}
MARKERS = {0: "o", 1: "v", 2: "p"}  # by the number of compartments with a boundary (not fcalls)


def prepare(context: Context) -> None:
    out = fig06_out(context)
    found = (out / "fig-06_runs.csv").exists()
    print(f"  fig-06's runs: {out / 'fig-06_runs.csv'} " + ("found" if found else "missing: run will run fig-06 first"))


def run(context: Context) -> None:
    summary = summarize(fig06_runs(context))
    by_app = {(s["app"], s["config"]): s for s in summary}
    configs = {c.name: c for c in explored_space(context, "kv").configurations()}
    rows = []
    for name, config in configs.items():
        kv, http = by_app.get(("kv", name)), by_app.get(("http", name))
        if kv is None or http is None:
            continue  # not in both spaces (cannot happen with fig-06's two spaces; kept honest)
        rows.append(
            {
                "config": name,
                "layout": kv["layout"],
                "isolated_compartments": sum(c.driver != "fcalls" for c in config.compartments),
                "strongest": strongest(config),
                "kv_x": kv["x_no_isolation"],
                "http_x": http["x_no_isolation"],
                "kv_failed": kv["failed"],
                "http_failed": http["failed"],
            }
        )
    write_csv(context.out / "fig-07_pairs.csv", rows)


def plot(context: Context) -> None:
    rows = read_csv(context.out / "fig-07_pairs.csv")
    both = [r for r in rows if r["kv_x"] and r["http_x"]]
    either = [r for r in rows if bool(r["kv_x"]) != bool(r["http_x"])]
    neither = [r for r in rows if not r["kv_x"] and not r["http_x"]]
    print_table(
        ["configuration", "kv x", "http x", "layout / failure"],
        [
            [
                r["config"],
                r["kv_x"] or "failed",
                r["http_x"] or "failed",
                (r["kv_failed"] or r["http_failed"] or r["layout"])[:80],
            ]
            for r in rows
        ],
    )
    kept_more = sum(float(r["http_x"]) > float(r["kv_x"]) for r in both)
    print(f"http keeps more of its throughput than kv in {kept_more} of {len(both)} configurations both can run")
    write_csv(
        context.out / "fig-07_summary.csv",
        [
            {"what": "configurations both apps run", "count": len(both)},
            {"what": "http keeps more of its throughput than kv", "count": kept_more},
            {"what": "only one app runs", "count": len(either)},
            {"what": "neither app runs", "count": len(neither)},
        ],
    )

    figure, (pairs, scatter) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [2.6, 1.4]})
    order = sorted(both, key=lambda r: -float(r["kv_x"])) + either  # the ones neither app runs are left out
    width = 0.4
    for offset, app in ((-width / 2, "kv"), (width / 2, "http")):
        columns = [i + offset for i, r in enumerate(order) if r[f"{app}_x"]]
        values = [float(r[f"{app}_x"]) for r in order if r[f"{app}_x"]]
        pairs.bar(columns, values, width, color=APP_COLORS[app], label=app)
        for i, r in enumerate(order):
            if not r[f"{app}_x"]:
                pairs.text(i + offset, 0.02, f"{app} cannot run", rotation=90, fontsize=6, va="bottom", ha="center")
    pairs.axhline(1.0, color="black", linewidth=0.8)
    pairs.set_xticks(range(len(order)), [r["config"] for r in order], rotation=90, fontsize=6)
    pairs.set_xlim(-0.7, len(order) - 0.3)
    pairs.set_ylabel(f"x its own {NO_ISOLATION} (no isolation)")
    pairs.set_title(
        f"kv and http in the same configurations, medians of fig-06's rounds ({len(neither)} configurations run in "
        "neither app: not shown)",
        fontsize=9,
    )
    pairs.legend(fontsize=8, loc="upper right")

    for count, marker in MARKERS.items():
        for kind in MECHANISMS:
            points = [r for r in both if int(r["isolated_compartments"]) == count and r["strongest"] == kind]
            if points:
                scatter.scatter(
                    [float(r["kv_x"]) for r in points],
                    [float(r["http_x"]) for r in points],
                    marker=marker,
                    color=COLORS[kind],
                    edgecolors="black",
                    linewidths=0.4,
                    s=40,
                )
    top = max([1.05] + [float(r[f"{app}_x"]) * 1.05 for r in both for app in ("kv", "http")])
    scatter.plot((0, top), (0, top), color="#306bac", linestyle="--", linewidth=0.8)
    scatter.set_xlim(0, top)
    scatter.set_ylim(0, top)
    scatter.set_aspect("equal")
    scatter.grid(linestyle="--", linewidth=0.4)
    scatter.set_xlabel("kv normalized")
    scatter.set_ylabel("http normalized")
    scatter.set_title("as FlexOS's fig. 7 (Redis across, Nginx up)", fontsize=9)
    handles = [
        plt.Line2D([], [], marker=m, linestyle="", color="grey", label=f"{n} isolated compartment{'s' * (n != 1)}")
        for n, m in MARKERS.items()
    ] + [plt.Line2D([], [], marker="s", linestyle="", color=COLORS[k], label=k) for k in MECHANISMS]
    scatter.legend(handles=handles, fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    save(figure, context.out, "fig-07_kv-http-normalized")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
