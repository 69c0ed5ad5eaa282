"""What ``flexos trace``'s recorder costs the traced app: loops of the calls it watches, plainly and
under the recorder (``python -m flexos.trace``), side by side.

Each loop runs in a fresh interpreter and times itself (so the recorder's start and the record's
writing are left out), in alternating rounds. The loops: calls inside one unit (``PY_START`` seen,
nothing recorded), calls from the app into another unit (a crossing: counted, a tenth measured),
calls of a C function of another unit (``CALL`` seen), and standard-library code (its code objects
are disabled at their first call). The apps' own figures are bench/trace_predict.py's "tracing"
column. Run::

    .venv/bin/python bench/trace_overhead.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LIBRARY = """
def inner(value):
    return value


def internal(n):
    for i in range(n):
        inner(i)
"""
APP = """
import sys
import textwrap
import time
import _json

import tracelib

LOOPS = {
    "calls inside a unit": lambda n: tracelib.internal(n),
    "calls into another unit": lambda n: [tracelib.inner(i) for i in range(n)],
    "C calls into another unit": lambda n: [_json.scanstring('"abc"', 1) for _ in range(n)],
    "standard-library code": lambda n: [textwrap.dedent("  a\\n  b") for _ in range(n // 10)],
}
loop, n = LOOPS[sys.argv[1]], int(sys.argv[2])
loop(1000)
started = time.perf_counter()
loop(n)
print((time.perf_counter() - started) / n)
"""
LOOPS = ["calls inside a unit", "calls into another unit", "C calls into another unit", "standard-library code"]


def timed(directory: Path, loop: str, n: int, traced: bool) -> float:
    prefix = [sys.executable, "-m", "flexos.trace", str(directory / "run.json")] if traced else [sys.executable]
    done = subprocess.run([*prefix, "app.py", loop, str(n)], cwd=directory, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{loop}: {done.stderr}")
    return float(done.stdout.split()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    n, rounds = (20_000, 1) if args.quick else (200_000, 3)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="flexos-trace-overhead-") as tmp:
        directory = Path(tmp)
        (directory / "tracelib.py").write_text(LIBRARY)
        (directory / "app.py").write_text(APP)
        for loop in LOOPS:
            plain, traced = [], []
            for round_ in range(rounds):
                for kind in ("plain", "traced") if round_ % 2 == 0 else ("traced", "plain"):
                    (traced if kind == "traced" else plain).append(timed(directory, loop, n, kind == "traced"))
            rows[loop] = {"plain_us": statistics.median(plain) * 1e6, "traced_us": statistics.median(traced) * 1e6}
    print(f"{'loop':<28} {'plain':>10} {'traced':>10} {'ratio':>7}")
    for loop, row in rows.items():
        ratio = row["traced_us"] / row["plain_us"]
        row["ratio"] = ratio
        print(f"{loop:<28} {row['plain_us']:>8.3f}us {row['traced_us']:>8.3f}us {ratio:>6.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
