"""What a ``vm`` compartment costs, side by side with a ``process`` compartment and a plain call.

Measured in one run: time from ``flexos.boot`` to the first answered call (each in a fresh
interpreter, so nothing is pooled: a cold guest boot for vm), the same for a restart that takes a
booted guest from the pool, the median and p99 of a small call ``f(x) -> x`` (direct, process, vm in
alternating rounds), how much slower Python computes inside the guest (a loop, and a gate's own
Python work), and QEMU's resident memory and idle CPU (with a compartment in the guest, and
pooled). Run::

    .venv/bin/python bench/vm_gate.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gate_latency import percentile, time_calls, timer_overhead_ns

import flexos
from flexos import CompartmentSpec, Image
from flexos.drivers import unavailable
from flexos.vm.machine import choose_accelerator

LIBRARY = '''"""A library for the vm benchmark."""

import time


def f(x):
    return x


def strict_gate(n):
    """Seconds per call through a strict-fcalls gate run here: the Python half of any gate, both sides."""
    import sys

    import flexos
    from flexos import CompartmentSpec, Image

    compartments = {
        "app": CompartmentSpec("app", "fcalls", default=True),
        "s": CompartmentSpec("s", "fcalls", {"strict": True}),
    }
    with flexos.Runtime(Image(compartments, {"colorsys": "s"}), local="app"):
        sys.modules.pop("colorsys", None)
        import colorsys

        start = time.perf_counter()
        for _ in range(n):
            colorsys.rgb_to_hsv(0.1, 0.2, 0.3)
        return (time.perf_counter() - start) / n


def compute(n):
    """Pure-Python work: n loop iterations; returns the seconds it took here."""
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - start
'''

FIRST_CALL = """
import sys, time
start = time.perf_counter()
import flexos
sys.path.insert(0, {workdir!r})
with flexos.boot(flexos.Image.from_dict({image!r})):
    import {module}
    {module}.f(1)
    print(time.perf_counter() - start)
"""

GOALS = [
    ("vm gate median (TCG)", "vm_median_us", "<=", 10.0, "us"),
    ("vm boot to first call (TCG)", "vm_boot_s", "<=", 10.0, "s"),
]


def image(libraries: dict[str, tuple[str, str]]) -> Image:
    """``libraries``: module -> (compartment, driver)."""
    compartments = {"app": CompartmentSpec("app", "fcalls", default=True)}
    for compartment, driver in libraries.values():
        compartments[compartment] = CompartmentSpec(compartment, driver)
    return Image(compartments, {module: owner for module, (owner, _) in libraries.items()}, source="<vm bench>")


def first_call_seconds(workdir: Path, module: str, driver: str) -> float:
    """Seconds from interpreter start to the first answered call, in a fresh interpreter."""
    code = FIRST_CALL.format(workdir=str(workdir), image=image({module: ("box", driver)}).to_dict(), module=module)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return float(done.stdout.split()[-1])


def proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds used, resident KiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    return cpu, rss


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per mechanism (20000)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (10)")
    parser.add_argument("--boots", type=int, default=2, help="cold boots measured per driver (2)")
    parser.add_argument("--quick", action="store_true", help="a small run for smoke tests")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    if args.quick:
        args.calls, args.rounds, args.boots = 400, 2, 1
    reason = unavailable("vm")
    if reason:
        sys.exit(f"vm driver unavailable here: {reason}")
    accelerator, why = choose_accelerator("auto")
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="flexos-vm-bench-") as scratch:
        workdir = Path(scratch)
        for module in ("lib_vm", "lib_process", "lib_direct"):
            (workdir / f"{module}.py").write_text(LIBRARY)
        sys.path.insert(0, str(workdir))

        boots = {"process": [], "vm": []}
        for _ in range(args.boots):
            for driver in boots:
                boots[driver].append(first_call_seconds(workdir, f"lib_{driver}", driver))
        results["process_boot_s"] = statistics.median(boots["process"])
        results["vm_boot_s"] = statistics.median(boots["vm"])

        with flexos.boot(image({"lib_vm": ("box", "vm")})) as runtime:
            import lib_vm

            lib_vm.f(1)
            qemu = runtime.compartments["box"].pid
        start = time.perf_counter()
        with flexos.boot(image({"lib_vm": ("box", "vm")})) as runtime:
            sys.modules.pop("lib_vm", None)
            import lib_vm

            lib_vm.f(1)
            results["vm_warm_start_s"] = time.perf_counter() - start
            assert runtime.compartments["box"].pid == qemu, "the guest was not taken from the pool"

        with flexos.boot(image({"lib_vm": ("box", "vm"), "lib_process": ("proc", "process")})) as runtime:
            sys.modules.pop("lib_vm", None)
            import lib_direct
            import lib_process
            import lib_vm

            calls = {"direct": lib_direct.f, "process": lib_process.f, "vm": lib_vm.f}
            samples: dict[str, list[int]] = {name: [] for name in calls}
            round_medians: dict[str, list[float]] = {name: [] for name in calls}
            for f in calls.values():
                time_calls(f, min(2000, args.calls))
            per_round = max(1, args.calls // args.rounds)
            order = list(calls)
            for index in range(args.rounds):
                for name in order[index % len(order) :] + order[: index % len(order)]:
                    taken = time_calls(calls[name], per_round)
                    samples[name] += taken
                    round_medians[name].append(statistics.median(taken) / 1000)
            for name in calls:
                results[f"{name}_median_us"] = statistics.median(round_medians[name])
                results[f"{name}_p99_us"] = percentile(samples[name], 0.99) / 1000

            work = 200_000 if args.quick else 2_000_000
            here, there = lib_direct.compute(work), lib_vm.compute(work)
            results["compute_slowdown"] = there / here
            results["strict_here_us"] = lib_direct.strict_gate(500) * 1e6
            results["strict_guest_us"] = lib_vm.strict_gate(500) * 1e6
            qemu = runtime.compartments["box"].pid
            cpu_before, _ = proc_stat(qemu)
            time.sleep(3)
            cpu_after, rss = proc_stat(qemu)
            results["vm_idle_cpu_percent"] = (cpu_after - cpu_before) / 3 * 100
            results["vm_rss_mib"] = rss / 1024
        cpu_before, _ = proc_stat(qemu)  # the runtime stopped: the guest waits in the pool
        time.sleep(3)
        cpu_after, _ = proc_stat(qemu)
        results["vm_pooled_cpu_percent"] = (cpu_after - cpu_before) / 3 * 100

    overhead = timer_overhead_ns() / 1000
    print(f"vm driver, accelerator {accelerator} ({why}); Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"(each latency sample includes ~{overhead:.3f} us of timer overhead)\n")
    print(f"{'':34}{'median us':>12}{'p99 us':>12}{'x direct':>10}")
    for name, label in (("direct", "direct Python call"), ("process", "flexos process"), ("vm", "flexos vm")):
        median = results[f"{name}_median_us"]
        ratio = median / results["direct_median_us"]
        print(f"{label:34}{median:12.3f}{results[f'{name}_p99_us']:12.3f}{ratio:10.1f}")
    print(f"\nvm gate vs process gate: {results['vm_median_us'] / results['process_median_us']:.1f}x")
    print(
        f"boot to first call (fresh interpreter, median of {args.boots}): process {results['process_boot_s']:.2f} s, "
        f"vm {results['vm_boot_s']:.2f} s (boots: {', '.join(f'{s:.2f}' for s in boots['vm'])})"
    )
    print(f"vm restart with a pooled guest, to first call: {results['vm_warm_start_s']:.2f} s")
    print(f"Python compute inside the guest: {results['compute_slowdown']:.1f}x slower than here")
    print(
        f"a strict-fcalls gate call (all of a gate's Python work, no transport): {results['strict_here_us']:.1f} us "
        f"here, {results['strict_guest_us']:.1f} us inside the guest"
    )
    rss, idle = results["vm_rss_mib"], results["vm_idle_cpu_percent"]
    pooled = results["vm_pooled_cpu_percent"]
    print(f"QEMU per vm compartment: RSS {rss:.0f} MiB, idle CPU {idle:.1f}% of one core ({pooled:.1f}% pooled)")
    print()
    for label, key, comparison, threshold, unit in GOALS:
        value = results[key]
        met = value <= threshold if comparison == "<=" else value >= threshold
        print(f"{'PASS' if met else 'MISS'}  {label:30} {value:8.2f} {unit}  (goal {comparison} {threshold} {unit})")
    if args.json:
        Path(args.json).write_text(json.dumps({"accelerator": accelerator, **results}, indent=2))


if __name__ == "__main__":
    main()
