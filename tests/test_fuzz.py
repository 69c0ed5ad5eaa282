"""The fuzz targets of bench/fuzz.py: a small run in every suite, the full 10k-case run as slow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent.parent / "bench" / "fuzz.py"


def _run(examples: int, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FUZZ), "--examples", str(examples)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_fuzz_targets_quick() -> None:
    done = _run(200, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for target in ("config", "protocol", "replies"):
        assert f"{target}" in done.stdout and "ok" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fuzz_targets_three_thousand_cases_each() -> None:
    """Config loader, frame decoder and hostile replies: 3,000 cases per property in CI (a
    deliberate run, ``bench/fuzz.py``, makes 10,000)."""
    done = _run(3_000, timeout=1700)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("3000 cases per property: ok") == 3
