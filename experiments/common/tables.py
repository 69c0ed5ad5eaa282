"""CSV in and out, and the summaries every figure needs (medians, ratios to a baseline)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def write_csv(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def read_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the 'run' step first (make run, or experiment.py run)")
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def median_by(rows: list[dict[str, str]], keys: tuple[str, ...], value: str) -> dict[tuple[str, ...], float]:
    """Median of column ``value`` for each combination of ``keys`` (rows with an empty value are skipped)."""
    groups: dict[tuple[str, ...], list[float]] = {}
    for row in rows:
        if row[value] != "":
            groups.setdefault(tuple(row[key] for key in keys), []).append(float(row[value]))
    return {group: statistics.median(values) for group, values in groups.items()}


def print_table(header: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print(
            "  ".join(
                cell.ljust(width) if i == 0 else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
