"""What the subinterp driver buys: parallel compartments, and large buffers that are not copied.

Two measurements, each running its peers side by side in alternating rounds:

* **parallelism** — two app threads each call a CPU-bound function (a pure-Python loop) in a
  compartment. With two ``subinterp`` compartments each has its own GIL, so the two calls run on
  two cores; with two strict ``fcalls`` compartments (same interpreter, one GIL) they take
  turns. Printed: wall time for both threads vs one thread doing one call (2.0x = perfect
  scaling, 1.0x = none), and the same for two ``process`` compartments as the reference.
* **large buffers** — one call passing a 100 MiB ``bytes`` argument that the compartment reads
  (``len`` of a memoryview slice: it touches no pages) through ``subinterp`` (lent, zero-copy),
  ``process`` (copied through shared memory) and strict ``fcalls`` (encoded and decoded): GB/s.

Run::

    .venv/bin/python bench/subinterp.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import flexos
from flexos import CompartmentSpec, Image
from flexos.drivers import unavailable

WORK_SOURCE = '''"""CPU-bound work and a buffer reader for bench/subinterp.py."""


def spin(n):
    total = 0
    for i in range(n):
        total += i * i
    return total


def measure(buffer):
    return len(buffer[1:])
'''

VARIANTS = {
    "subinterp": ("subinterp", {}),
    "fcalls_strict": ("fcalls", {"strict": True}),
    "process": ("process", {}),
}


def boot(workdir: Path) -> tuple[flexos.Runtime, dict[str, list]]:
    """Two compartments per variant, each holding its own copy of the work module."""
    compartments = {"app": CompartmentSpec("app", "fcalls", default=True)}
    libraries = {}
    for key, (driver, options) in VARIANTS.items():
        for side in ("a", "b"):
            name = f"bench_work_{key}_{side}"
            (workdir / f"{name}.py").write_text(WORK_SOURCE)
            compartments[name] = CompartmentSpec(name, driver, dict(options))
            libraries[name] = name
    sys.path.insert(0, str(workdir))
    runtime = flexos.boot(Image(compartments=compartments, libraries=libraries, source="<bench/subinterp>"))
    modules = {key: [__import__(f"bench_work_{key}_{side}") for side in ("a", "b")] for key in VARIANTS}
    return runtime, modules


def both_in_parallel(first, second, n: int) -> tuple[float, float]:
    """Wall seconds for two threads each making one ``spin(n)`` call, started together, and the
    CPU seconds this process used meanwhile (for in-process compartments: cores busy x time)."""
    barrier = threading.Barrier(3)

    def work(module) -> None:
        barrier.wait()
        module.spin(n)

    threads = [threading.Thread(target=work, args=(module,)) for module in (first, second)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, time.process_time() - cpu


def one_call(module, n: int) -> float:
    start = time.perf_counter()
    module.spin(n)
    return time.perf_counter() - start


def transfer(module, buffer: bytes) -> float:
    start = time.perf_counter()
    assert module.measure(buffer) == len(buffer) - 1
    return time.perf_counter() - start


def run(spin_n: int, rounds: int, megabytes: int) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="flexos-bench-"))
    runtime = None
    try:
        runtime, modules = boot(workdir)
        for first, second in modules.values():  # start every compartment, warm every path
            first.spin(1000)
            second.spin(1000)
        single: dict[str, list[float]] = {key: [] for key in VARIANTS}
        double: dict[str, list[float]] = {key: [] for key in VARIANTS}
        cores: dict[str, list[float]] = {key: [] for key in VARIANTS}
        order = list(VARIANTS)
        for r in range(rounds):
            for key in order[r % len(order) :] + order[: r % len(order)]:
                first, second = modules[key]
                single[key].append(one_call(first, spin_n))
                wall, cpu = both_in_parallel(first, second, spin_n)
                double[key].append(wall)
                cores[key].append(cpu / wall)
        buffer = os.urandom(1 << 20) * megabytes
        seconds: dict[str, list[float]] = {key: [] for key in VARIANTS}
        for r in range(rounds):
            for key in order[r % len(order) :] + order[: r % len(order)]:
                seconds[key].append(transfer(modules[key][0], buffer))
    finally:
        if runtime is not None:
            runtime.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {}
    for key in VARIANTS:
        one, two = statistics.median(single[key]), statistics.median(double[key])
        results[key] = {
            "one_call_s": one,
            "two_threads_s": two,
            "scaling": 2 * one / two,
            # the process driver's work is in other processes: not counted here
            "cores_busy": statistics.median(cores[key]) if key != "process" else None,
            "buffer_s": statistics.median(seconds[key]),
            "buffer_gb_per_s": megabytes * (1 << 20) / statistics.median(seconds[key]) / 1e9,
        }
    return {
        "benchmark": "subinterp",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "spin_n": spin_n,
        "rounds": rounds,
        "buffer_mib": megabytes,
        "variants": results,
    }


def report(result: dict) -> None:
    print(
        f"parallel compartments: spin({result['spin_n']}) per thread, median of {result['rounds']} alternating "
        f"rounds; Python {result['python']}, {result['cpus']} CPUs"
    )
    print(
        f"{'driver':<16} {'1 call s':>9} {'2 threads s':>12} {'scaling':>8} {'cores busy':>11}"
        "   (scaling 2.0x = both cores, 1.0x = one)"
    )
    for key, row in result["variants"].items():
        busy = f"{row['cores_busy']:.2f}" if row["cores_busy"] is not None else "-"
        print(f"{key:<16} {row['one_call_s']:>9.3f} {row['two_threads_s']:>12.3f} {row['scaling']:>7.2f}x {busy:>11}")
    print(f"\na {result['buffer_mib']} MiB bytes argument, one call (median of {result['rounds']})")
    print(f"{'driver':<16} {'seconds':>9} {'GB/s':>9}")
    for key, row in result["variants"].items():
        print(f"{key:<16} {row['buffer_s']:>9.4f} {row['buffer_gb_per_s']:>9.1f}")
    rows = result["variants"]
    print(
        f"\nsubinterp scaling {rows['subinterp']['scaling']:.2f}x vs one GIL {rows['fcalls_strict']['scaling']:.2f}x; "
        f"100 MiB: subinterp {rows['subinterp']['buffer_gb_per_s'] / rows['process']['buffer_gb_per_s']:.0f}x "
        f"the process driver's GB/s"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spin", type=int, default=3_000_000, help="loop iterations per call (3,000,000)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (5)")
    parser.add_argument("--mib", type=int, default=100, help="size of the buffer argument in MiB (100)")
    parser.add_argument("--quick", action="store_true", help="a small run for CI smoke tests")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args(argv)
    reason = unavailable("subinterp")
    if reason:
        print(f"bench/subinterp.py: nothing to measure: {reason}")
        return
    if args.quick:
        args.spin, args.rounds, args.mib = 100_000, 1, 8
    result = run(args.spin, args.rounds, args.mib)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
