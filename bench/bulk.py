"""100 MB into a process compartment and 100 MB back, beside the one-copy limits of the same run.

Rows, each a transfer of ``--mb`` MB, alternating over rounds (the order rotates each round):

- one copy, fresh ``bytes``: ``bytes(view)`` of the payload (what receiving ``bytes`` must at
  least cost: a fresh object, page faults included);
- one copy into a pre-faulted shared mapping: what lending a buffer to be viewed must at least cost;
- flexos process, ``bytes`` in / back: ``lib.take(data)`` (the library gets ``bytes``) and
  ``lib.give()`` (it returns ``bytes`` it holds);
- flexos process, ``view`` in / back: the same with the library declared ``sharing: {buffers:
  view}`` (the receiver gets a read-only memoryview: the compartment of the app's arena in
  place, the app of a copy of its own).

GB/s is the payload over the median round; the ratios compare medians of the same run. Run::

    .venv/bin/python bench/bulk.py [--mb 100] [--rounds 7] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import importlib
import json
import mmap
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import flexos
from flexos import CompartmentSpec, Image

LIBRARY = '''"""A library that takes and gives large buffers (for bench/bulk.py)."""

_held = None


def hold(size):
    global _held
    _held = bytes(size)
    return len(_held)


def take(data):
    return type(data).__name__, len(data)


def give():
    return _held
'''

ROWS = {
    "fresh_bytes": "one copy: a fresh bytes (page faults included)",
    "prefaulted": "one copy into a pre-faulted shared mapping",
    "bytes_in": "flexos process, bytes in",
    "bytes_back": "flexos process, bytes back",
    "view_in": "flexos process, view in",
    "view_back": "flexos process, view back",
}
GOALS = [
    ("bytes in vs one copy", "bytes_in", "fresh_bytes", 0.7),
    ("bytes back vs one copy", "bytes_back", "fresh_bytes", 0.7),
]
VIEW_GOAL_GBPS = 5.0


def _image(directory: Path) -> Image:
    big = 1 << 30  # max_reply: a 100 MB result must be admitted
    compartments = {
        "app": CompartmentSpec("app", "fcalls", default=True),
        "copybox": CompartmentSpec("copybox", "process", max_reply=big),
        "viewbox": CompartmentSpec("viewbox", "process", max_reply=big),
    }
    return Image(
        compartments=compartments,
        libraries={"bulkcopy": "copybox", "bulkview": "viewbox"},
        source=f"<bench/bulk.py: {directory}>",
        library_sharing={"bulkview": {"buffers": "view"}},
    )


def measure(size: int, rounds: int) -> dict[str, list[float]]:
    payload = bytes(range(256)) * (size // 256)
    shared = mmap.mmap(-1, size)
    shared[:] = payload  # pre-faulted
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("bulkcopy", "bulkview"):
            (Path(tmp) / f"{name}.py").write_text(LIBRARY)
        sys.path.insert(0, tmp)
        runtime = flexos.boot(_image(Path(tmp)))
        try:
            copy = importlib.import_module("bulkcopy")
            view = importlib.import_module("bulkview")
            copy.hold(size)
            view.hold(size)
            assert copy.take(payload) == ("bytes", size) and type(copy.give()) is bytes
            assert view.take(payload) == ("memoryview", size) and type(view.give()) is memoryview

            def prefaulted() -> None:
                shared[:] = payload

            transfers: dict[str, Callable[[], object]] = {
                "fresh_bytes": lambda: bytes(memoryview(payload)),
                "prefaulted": prefaulted,
                "bytes_in": lambda: copy.take(payload),
                "bytes_back": copy.give,
                "view_in": lambda: view.take(payload),
                "view_back": view.give,
            }
            times: dict[str, list[float]] = {key: [] for key in transfers}
            keys = list(transfers)
            for round_number in range(rounds):
                order = keys[round_number % len(keys) :] + keys[: round_number % len(keys)]
                for key in order:
                    start = time.perf_counter()
                    result = transfers[key]()
                    times[key].append(time.perf_counter() - start)
                    del result
            return times
        finally:
            runtime.stop()
            sys.path.remove(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="8 MB, 3 rounds")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    mb, rounds = (8, 3) if args.quick else (args.mb, args.rounds)
    size = mb * 1_000_000
    times = measure(size, rounds)
    rate = {key: size / statistics.median(samples) / 1e9 for key, samples in times.items()}
    print(f"{mb} MB per transfer, {rounds} rounds; GB/s of the median round (range over rounds)")
    for key, label in ROWS.items():
        low, high = size / max(times[key]) / 1e9, size / min(times[key]) / 1e9
        print(f"  {label:48s} {rate[key]:6.2f} GB/s  ({low:.2f}-{high:.2f})")
    print("goals:")
    for label, row, limit, threshold in GOALS:
        ratio = rate[row] / rate[limit]
        verdict = "PASS" if ratio >= threshold else "MISS"
        print(f"  {label:48s} {ratio:6.2f}x  (goal >= {threshold}x)  {verdict}")
    for row in ("view_in", "view_back"):
        verdict = "PASS" if rate[row] >= VIEW_GOAL_GBPS else "MISS"
        ratio = rate[row] / rate["prefaulted"]
        print(
            f"  {ROWS[row]:48s} {rate[row]:6.2f} GB/s, {ratio:.2f}x the pre-faulted copy "
            f"(goal >= {VIEW_GOAL_GBPS} GB/s)  {verdict}"
        )
    if args.json:
        args.json.write_text(json.dumps({"mb": mb, "rounds": rounds, "seconds": times, "gbps": rate}, indent=2))


if __name__ == "__main__":
    main()
