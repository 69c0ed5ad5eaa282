"""FlexOS figure 11, on Python: (a) gate latency per mechanism, (b) the cost of handing a buffer over.

(a) the round trip of a small call ``f(1) -> 1`` into a module placed in a compartment of each
mechanism, beside a plain Python call and a system call made from Python (FlexOS compared its
gates with a Linux system call). (b) allocating a buffer of N bytes and handing it to a function
in the other compartment, which reads its length: the analog of FlexOS's shared-buffer
allocation (there, heap vs. data shadow stack), since flexos shares no memory but copies or, for
subinterpreters, lends buffers. Mechanisms alternate over rounds; a result is the median of
the round medians.
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import flexos
from experiments.common import paper
from experiments.common.apps import rotated
from experiments.common.plotting import COLORS, plt, save
from experiments.common.steps import Context, main
from experiments.common.tables import median_by, print_table, read_csv, write_csv
from flexos.drivers import unavailable

FOLDER = Path(__file__).resolve().parent
ECHO = '''"""Called through a gate by the latency experiment."""


def echo(x):
    return x


def length(buffer):
    return len(buffer)
'''
# mechanism key -> (label, colour kind, compartment mechanism YAML or None for no compartment)
MECHANISMS = {
    "plain": ("plain Python call", "none", None),
    "syscall": ("os.getppid() (a system call)", "none", None),
    "fcalls": ("fcalls", "fcalls", "{driver: fcalls}"),
    "strict": ("fcalls strict", "strict", "{driver: fcalls, strict: true}"),
    "subinterp": ("subinterp", "subinterp", "{driver: subinterp}"),
    "process": ("process", "process", "{driver: process}"),
    "hardened": ("process + hardening", "process-hardened", "{driver: process}"),
}
HARDENING = """    hardening:
      env: clean
      network: none
      filesystem: {read: [], write: []}
      seccomp: compute-only
      limits: {memory: 512MiB, open_files: 64, processes: 0}
"""
BUFFER_SIZES = [64, 4096, 65536, 1 << 20]


def plan(context: Context) -> tuple[int, int, int]:
    """(rounds, timed calls per round, warm-up calls)."""
    return (2, 200, 100) if context.smoke else (10, 2000, 2000)


def usable() -> dict[str, str]:
    """Mechanism key -> why it is skipped here (only the skipped ones)."""
    return {key: reason for key in ("subinterp",) if (reason := unavailable(key))}


def prepare(context: Context) -> None:
    skipped = usable()
    for key, (label, _, _) in MECHANISMS.items():
        print(f"  {label:<30} {'SKIPPED: ' + skipped[key] if key in skipped else 'ok'}")


def write_image(workdir: Path, keys: list[str]) -> Path:
    """Modules ``echo_KEY`` and a flexos.yaml placing each in a compartment of its mechanism."""
    lines = ["compartments:", "  - name: app", "    mechanism: {driver: fcalls}", "    default: true"]
    libraries = ["libraries:"]
    for key in keys:
        mechanism = MECHANISMS[key][2]
        (workdir / f"echo_{key}.py").write_text(ECHO)
        if mechanism is None:
            continue
        lines += [f"  - name: {key}", f"    mechanism: {mechanism}"]
        if key == "hardened":
            lines.append(HARDENING.rstrip("\n"))
        libraries.append(f"  echo_{key}: {{compartment: {key}}}")
    path = workdir / "flexos.yaml"
    path.write_text("\n".join(lines + libraries) + "\n")
    return path


def time_calls(call: Callable[[], object], n: int) -> float:
    """Median nanoseconds of ``n`` calls, each timed on its own."""
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        start = clock()
        call()
        samples[i] = clock() - start
    return statistics.median(samples)


def run(context: Context) -> None:
    rounds, calls, warmup = plan(context)
    skipped = usable()
    keys = [key for key in MECHANISMS if key not in skipped]
    workdir = Path(tempfile.mkdtemp(prefix="fig11-"))
    sys.path.insert(0, str(workdir))  # compartment processes inherit sys.path
    rows = [
        {"part": part, "mechanism": key, "label": MECHANISMS[key][0], "size": "", "round": "", "ns": "", "skipped": why}
        for key, why in skipped.items()
        for part in ("a", "b")
    ]
    try:
        with flexos.boot(write_image(workdir, keys)):
            modules = {key: importlib.import_module(f"echo_{key}") for key in keys}
            small: dict[str, Callable[[], object]] = {key: (lambda m=modules[key]: m.echo(1)) for key in keys}
            small["syscall"] = os.getppid
            buffers = {
                (key, size): (lambda m=modules[key], n=size: m.length(bytearray(n)))
                for key in keys
                if key != "syscall"
                for size in BUFFER_SIZES
            }
            overhead = time_calls(lambda: None, calls)
            for call in [*small.values(), *buffers.values()]:
                for _ in range(warmup):
                    call()
            for r in range(rounds):
                for key in rotated(keys, r):
                    rows.append(_row("a", key, "", r, time_calls(small[key], calls)))
                    for size in BUFFER_SIZES if key != "syscall" else ():
                        rows.append(_row("b", key, size, r, time_calls(buffers[(key, size)], calls)))
                print(f"  round {r + 1}/{rounds} done")
    finally:
        sys.path.remove(str(workdir))
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"(every sample includes the timer's own cost, {overhead:.0f} ns)")
    write_csv(context.out / "fig-11_runs.csv", rows)


def _row(part: str, key: str, size: int | str, round_: int, ns: float) -> dict:
    return {
        "part": part,
        "mechanism": key,
        "label": MECHANISMS[key][0],
        "size": size,
        "round": round_,
        "ns": f"{ns:.1f}",
        "skipped": "",
    }


def _cell(ns: float, plain_ns: float) -> str:
    return f"{ns / 1000:.2f} ({ns / plain_ns:.0f}x)"


def plot(context: Context) -> None:
    rows = read_csv(context.out / "fig-11_runs.csv")
    gate = median_by([r for r in rows if r["part"] == "a"], ("mechanism",), "ns")
    buffer = median_by([r for r in rows if r["part"] == "b"], ("mechanism", "size"), "ns")
    plain = gate[("plain",)]
    summary = [
        {
            "part": "a",
            "mechanism": key,
            "label": MECHANISMS[key][0],
            "size": "",
            "median_us": f"{gate[(key,)] / 1000:.3f}",
            "x_plain": f"{gate[(key,)] / plain:.1f}",
        }
        for key in MECHANISMS
        if (key,) in gate
    ]
    summary += [
        {
            "part": "b",
            "mechanism": key,
            "label": MECHANISMS[key][0],
            "size": size,
            "median_us": f"{buffer[(key, str(size))] / 1000:.3f}",
            "x_plain": f"{buffer[(key, str(size))] / buffer[('plain', str(size))]:.1f}",
        }
        for key in MECHANISMS
        for size in BUFFER_SIZES
        if (key, str(size)) in buffer
    ]
    write_csv(context.out / "fig-11_summary.csv", summary)
    print("(a) gate latency, f(1) -> 1")
    print_table(
        ["mechanism", "median us", "x plain call"],
        [[s["label"], s["median_us"], s["x_plain"]] for s in summary if s["part"] == "a"],
    )
    print("(b) allocate N bytes and hand them to the other side (µs; x the same with a plain call)")
    shown = [key for key in MECHANISMS if (key, str(BUFFER_SIZES[0])) in buffer]
    print_table(
        ["mechanism", *[f"{size} B" for size in BUFFER_SIZES]],
        [
            [
                MECHANISMS[key][0],
                *[_cell(buffer[(key, str(size))], buffer[("plain", str(size))]) for size in BUFFER_SIZES],
            ]
            for key in shown
        ],
    )
    for row in rows:
        if row["skipped"] and row["part"] == "a":
            print(f"  {row['label']}: skipped: {row['skipped']}")

    figure, (a_ours, a_paper, b) = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    measured = [s for s in summary if s["part"] == "a"]
    medians = [float(s["median_us"]) for s in measured]
    spreads = [
        [float(r["ns"]) / 1000 for r in rows if r["part"] == "a" and r["mechanism"] == s["mechanism"]] for s in measured
    ]
    bars = a_ours.bar(
        [s["label"].replace(" (a system call)", "\n(syscall)").replace(" + ", " +\n") for s in measured],
        medians,
        yerr=[
            [m - min(v) for m, v in zip(medians, spreads, strict=True)],
            [max(v) - m for m, v in zip(medians, spreads, strict=True)],
        ],
        capsize=3,
        ecolor="#555555",
        color=[COLORS[MECHANISMS[s["mechanism"]][1]] for s in measured],
    )
    a_ours.bar_label(bars, labels=[f"{s['median_us']} µs\n{s['x_plain']}x" for s in measured], fontsize=7)
    a_ours.set_yscale("log")
    a_ours.margins(y=0.25)
    a_ours.set_ylabel("round trip (µs, log scale; bars: round medians min-max)")
    a_ours.set_title("(a) flexos gate latency, this machine")
    a_ours.tick_params(axis="x", labelsize=7, rotation=30)

    function_call = paper.GATE_CYCLES[0][1]
    bars = a_paper.bar(
        [name for name, _ in paper.GATE_CYCLES],
        [cycles for _, cycles in paper.GATE_CYCLES],
        color=COLORS["flexos-paper"],
    )
    a_paper.bar_label(bars, labels=[f"{c}\n{c / function_call:.0f}x" for _, c in paper.GATE_CYCLES], fontsize=7)
    a_paper.set_ylabel("cycles")
    a_paper.margins(y=0.15)
    a_paper.set_title("(a) FlexOS gate latency (paper, fig. 11a)")
    a_paper.tick_params(axis="x", labelsize=7, rotation=30)

    for key in shown:
        b.plot(
            BUFFER_SIZES,
            [buffer[(key, str(size))] / 1000 for size in BUFFER_SIZES],
            marker="o",
            label=MECHANISMS[key][0],
            color=COLORS[MECHANISMS[key][1]],
        )
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("buffer size (bytes)")
    b.set_ylabel("allocate + hand over (µs, log scale)")
    b.set_title("(b) handing a new buffer to the other side")
    b.grid(True, which="both", alpha=0.3)
    b.legend(fontsize=7)
    save(figure, context.out, "fig-11_gate-latency")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
