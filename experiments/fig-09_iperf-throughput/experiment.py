"""FlexOS figure 9, on Python: TCP receive throughput vs receive size, with the network stack behind a gate.

The app (apps/iperf) receives a stream from the real ``iperf -c`` through its network stack
component, asking for ``recv_size`` bytes per call; under flexos every call crosses a gate into the
stack's compartment and the bytes come back across it. Each point is one connection, measured by
the server from its first byte to the end of the stream; configurations alternate over rounds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from experiments.common import paper
from experiments.common.apps import AppProcess, Variant, mechanism_variants, refusal, rotated, usable_variants
from experiments.common.clients import iperf_send
from experiments.common.plotting import COLORS, plt, save
from experiments.common.steps import Context, main, require_tools
from experiments.common.tables import median_by, print_table, read_csv, write_csv

FOLDER = Path(__file__).resolve().parent
APP = "iperf"
VARIANTS = mechanism_variants("fcalls", "subinterp", "process")
SIZES = paper.IPERF_SIZES  # 16 B .. 16 KiB, as FlexOS
# Socket buffers of both ends: what is still in flight when the sender stops must be received
# too, at the slowest configuration's pace, so they are kept small (iperf -w, and the server's).
WINDOW = 128 * 1024
REPORT = re.compile(r"^\{.*\"recv_size\".*\}$")


def plan(context: Context) -> tuple[float, int, list[int]]:
    """(seconds per point, rounds, receive sizes)."""
    return (0.2, 1, [64, 4096]) if context.smoke else (2.0, 3, SIZES)


def prepare(context: Context) -> None:
    require_tools(("iperf", "iperf"))
    for variant in VARIANTS:
        reason = refusal(APP, variant)
        print(f"  {variant.label:<12} {'ok' if reason is None else 'SKIPPED: ' + reason}")


def measure(variant: Variant, size: int, seconds: float, workdir: Path) -> dict:
    args = ["--port", "0", "--recv-size", str(size), "--window", str(WINDOW), "--connections", "1"]
    with AppProcess(APP, variant, args, workdir) as server:
        port = server.wait_listening()
        client = iperf_send(port, seconds, WINDOW)
        report = json.loads(server.wait_for_line(REPORT, timeout=600).group(0))
    return {**report, "client_gbit_per_s": client}


def run(context: Context) -> None:
    require_tools(("iperf", "iperf"))
    seconds, rounds, sizes = plan(context)
    usable, skipped = usable_variants(APP, VARIANTS)
    rows = [_row(variant, "", "", skipped=skipped[variant.key]) for variant in VARIANTS if variant.key in skipped]
    workdir = Path(tempfile.mkdtemp(prefix="fig09-"))
    try:
        for r in range(rounds):
            for variant in rotated(usable, r):
                for size in sizes:
                    try:
                        result = measure(variant, size, seconds, workdir / variant.key)
                    except RuntimeError as exc:
                        print(f"  round {r} {variant.label:<10} {size:>6} B  FAILED: {exc}")
                        rows.append(_row(variant, r, size, failed=str(exc).splitlines()[-1]))
                        continue
                    print(
                        f"  round {r} {variant.label:<10} {size:>6} B  {result['gbit_per_s']:8.4f} Gbit/s "
                        f"({result['recv_calls']} receives)"
                    )
                    rows.append(_row(variant, r, size, result=result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_csv(context.out / "fig-09_runs.csv", rows)


def _row(variant: Variant, round_: int | str, size: int | str, result: dict | None = None, **note: str) -> dict:
    result = result or {}
    return {
        "config": variant.key,
        "label": variant.label,
        "round": round_,
        "recv_size": size,
        "bytes": result.get("bytes", ""),
        "seconds": f"{result['seconds']:.6f}" if result else "",
        "recv_calls": result.get("recv_calls", ""),
        "gbit_per_s": f"{result['gbit_per_s']:.6f}" if result else "",
        "client_gbit_per_s": f"{result['client_gbit_per_s']:.6f}" if result else "",
        "load": f"{os.getloadavg()[0]:.2f}",
        "skipped": note.get("skipped", ""),
        "failed": note.get("failed", ""),
    }


def plot(context: Context) -> None:
    rows = read_csv(context.out / "fig-09_runs.csv")
    medians = median_by(rows, ("config", "recv_size"), "gbit_per_s")
    summary = []
    sizes = [size for size in SIZES if any(key[1] == str(size) for key in medians)]
    for variant in VARIANTS:
        for size in sizes:
            value = medians.get((variant.key, str(size)))
            base = medians.get(("none", str(size)))
            if value is not None:
                summary.append(
                    {
                        "config": variant.key,
                        "label": variant.label,
                        "recv_size": size,
                        "median_gbit_per_s": f"{value:.5f}",
                        "x_no_flexos": f"{value / base:.3f}" if base else "",
                    }
                )
    write_csv(context.out / "fig-09_summary.csv", summary)
    shown = [v for v in VARIANTS if any(s["config"] == v.key for s in summary)]
    print_table(
        ["recv size", *[v.label for v in shown]],
        [
            [size, *[f"{medians[(v.key, str(size))]:.4f}" if (v.key, str(size)) in medians else "-" for v in shown]]
            for size in sizes
        ],
    )
    for variant in VARIANTS:
        notes = {row["skipped"] or row["failed"] for row in rows if row["config"] == variant.key} - {""}
        for note in sorted(notes):
            print(f"  {variant.label}: {note}")

    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    for variant in shown:
        ys = [medians.get((variant.key, str(size))) for size in sizes]
        left.plot(sizes, ys, marker="o", label=f"flexos {variant.label}", color=COLORS[variant.kind])
        base = [medians.get(("none", str(size))) for size in sizes]
        right.plot(
            sizes,
            [y / b if y and b else None for y, b in zip(ys, base, strict=True)],
            marker="o",
            label=f"flexos {variant.label}",
            color=COLORS[variant.kind],
        )
    flexos_base = paper.IPERF_GBITS["Unikraft"]
    for (name, values), style in zip(
        [(k, v) for k, v in paper.IPERF_GBITS.items() if k != "Unikraft"],
        [(0, (1, 1)), "--", "-.", (0, (5, 1, 1, 1, 1, 1))],
        strict=True,
    ):
        right.plot(
            SIZES,
            [v / b for v, b in zip(values, flexos_base, strict=True)],
            linestyle=style,
            color=COLORS["flexos-paper"],
            label=f"{name} (paper)",
        )
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("receive size (bytes)")
        axis.grid(True, which="both", alpha=0.3)
    left.set_yscale("log", base=2)
    left.set_ylabel("throughput (Gbit/s)")
    left.set_title("flexos (Python, this machine)")
    left.legend(fontsize=8)
    right.set_ylabel("x its own baseline (no flexos / Unikraft)")
    right.set_yscale("log", base=2)
    right.set_title("ratios: flexos vs FlexOS (ASPLOS'22 fig. 9)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    figure.suptitle("TCP receive throughput, the network stack behind a gate (iperf -c as the sender)")
    save(figure, context.out, "fig-09_iperf-throughput")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
