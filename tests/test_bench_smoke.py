"""The benchmarks still run: each one with --quick exits 0 and prints every row. No timing checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flexos.drivers import unavailable

BENCH = Path(__file__).resolve().parent.parent / "bench"
SUBINTERP = unavailable("subinterp") is None  # rows the benchmarks print only where it runs

GATE_ROWS = [
    "direct Python call",
    "flexos fcalls (non-strict)",
    "flexos fcalls strict",
    "flexos process",
    *(["flexos subinterp", "stdlib _interpreters.call (3.13)"] if SUBINTERP else []),
    "multiprocessing.managers proxy",
    "RPyC (unix socket, cached netref)",
]
GATE_GOALS = [
    "process gate vs managers",
    "process gate vs RPyC",
    "process gate median",
    "fcalls vs direct",
    *(["subinterp gate median"] if SUBINTERP else []),
]
SQLITE_ROWS = [
    "no flexos",
    "flexos fcalls (non-strict)",
    "flexos fcalls strict",
    "flexos process",
    *(["flexos subinterp"] if SUBINTERP else []),
    "FlexOS MPK3",
    "FlexOS EPT2",
]


def run_quick(script: str, json_path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def row_labels(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def test_gate_latency_quick_prints_every_mechanism_and_goal(tmp_path):
    output = run_quick("gate_latency.py", tmp_path / "gate.json")
    lines = row_labels(output)
    for label in GATE_ROWS:
        assert any(line.startswith(label) for line in lines), f"no row for {label!r} in:\n{output}"
    for goal in GATE_GOALS:
        assert any(goal in line and line.startswith(("PASS", "MISS")) for line in lines), f"no verdict for {goal!r}"
    result = json.loads((tmp_path / "gate.json").read_text())
    assert list(result["placements"]) == ["quiet", "one-cpu", "busy"]
    for placement, measured in result["placements"].items():
        assert [row["label"] for row in measured["mechanisms"].values()] == GATE_ROWS
        assert measured["cpus"] == (1 if placement == "one-cpu" else len(os.sched_getaffinity(0)))
    assert any(line.startswith(("PASS", "MISS")) and "busy: process gate vs managers" in line for line in lines)


def test_sqlite_inserts_quick_prints_every_configuration(tmp_path):
    output = run_quick("sqlite_inserts.py", tmp_path / "sqlite.json")
    lines = row_labels(output)
    for label in SQLITE_ROWS:
        assert any(line.startswith(label) for line in lines), f"no row for {label!r} in:\n{output}"
    assert any(line.startswith(("PASS", "MISS")) and "process vs no flexos" in line for line in lines)
    result = json.loads((tmp_path / "sqlite.json").read_text())
    assert [row["label"] for row in result["configs"].values()] == SQLITE_ROWS[:-2]
    assert "in compartment" in result["configs"]["process"]["sqlite3_in"]
    assert "in compartment" not in result["configs"]["none"]["sqlite3_in"]


def test_subinterp_quick_prints_scaling_and_buffer_rows(tmp_path):
    output = run_quick("subinterp.py", tmp_path / "subinterp.json")
    if not SUBINTERP:
        assert "nothing to measure" in output
        return
    result = json.loads((tmp_path / "subinterp.json").read_text())
    assert set(result["variants"]) == {"subinterp", "fcalls_strict", "process"}
    for key, row in result["variants"].items():
        assert row["two_threads_s"] > 0 and row["buffer_gb_per_s"] > 0, key
        assert any(line.startswith(key) for line in row_labels(output))
