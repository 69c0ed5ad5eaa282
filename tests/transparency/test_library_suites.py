"""Real libraries' own test suites, unchanged, with the library in a compartment (issue 13).

Each (library, mechanism) pair runs its suite's CI sample once without flexos and once with the
library in compartment ``lib`` (library_suites.py), each run in a pytest of its own with a
timeout, and asserts that at least THRESHOLDS of the tests that pass without flexos still pass.
The full report (every lost test with its first line) is written to results/transparency/;
``python tests/transparency/library_suites.py measure`` runs the whole suites.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from library_suites import MECHANISMS, SUITES, LibrarySuite, Measurement, refused_by_subinterpreters

from flexos.pytest_plugin import SuiteRun

#: The least share of the tests that pass without flexos (under subinterp: without flexos and without
#: the C extensions a subinterpreter refuses) that must pass with the library on the mechanism, per
#: library and mechanism, on the CI sample. The goal is 0.95 for each, which the whole suites meet
#: (docs/gates.md, "What stays impossible"). On the CI sample on 2026-12-03 (a shared machine):
#: simplejson 96% / 96%, MarkupSafe 99% / 99% (96% when its two leak tests, 80,000 calls each, overrun
#: their 5 s under load), PyYAML 99% / 99%, dateutil 98% / 98%. Each threshold sits a few points under
#: (a sample of 79 or 96 tests loses 1-2% per test).
THRESHOLDS: dict[tuple[str, str], float] = {
    ("simplejson", "process"): 0.93,
    ("simplejson", "subinterp"): 0.93,
    ("markupsafe", "process"): 0.93,
    ("markupsafe", "subinterp"): 0.93,
    ("pyyaml", "process"): 0.95,
    ("pyyaml", "subinterp"): 0.95,
    ("dateutil", "process"): 0.93,
    ("dateutil", "subinterp"): 0.93,
}
#: One run (a suite's sample on one mechanism) ends after this long; what it did not reach is lost.
#: pyyaml's sample through a process compartment takes ~7 s alone and passed 20 s once beside the
#: rest of the suite on two busy cores: the bound leaves room for that load.
CI_RUN_TIMEOUT_S = 60.0
REPORTS = Path(__file__).parents[2] / "results" / "transparency"
# Under pytest-xdist, every suite on one worker: each plain run is made once, and the suites do not
# compete with each other for the 20 s of their runs.
pytestmark = pytest.mark.xdist_group("transparency")

_plain_runs: dict[tuple[str, tuple[str, ...]], SuiteRun] = {}


def plain_run(suite: LibrarySuite, where: Path, without: tuple[str, ...] = ()) -> SuiteRun:
    """The suite's sample without flexos (and ``without`` those modules), run once per session."""
    key = (suite.name, without)
    if key not in _plain_runs:
        run = suite.run("plain", where, sample=suite.ci_sample, without=without)
        assert run.passed(), f"{suite.name}'s suite passes nothing without flexos:\n{run.output}"
        _plain_runs[key] = run
    return _plain_runs[key]


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("library", list(SUITES))
def test_the_librarys_own_suite_passes_with_the_library_in_a_compartment(
    library: str, mechanism: str, tmp_path: Path
) -> None:
    suite = SUITES[library]
    plain = plain_run(suite, tmp_path)
    reference = None
    if mechanism == "subinterp" and suite.subinterpreter_refuses:
        # Compared with the library as it loads in a subinterpreter: only if, without flexos, its
        # extensions really refuse to load there (else their tests would hide a flexos failure).
        for module in suite.subinterpreter_refuses:
            assert refused_by_subinterpreters(module), f"{module} loads in a subinterpreter: its tests count"
        reference = plain_run(suite, tmp_path, suite.subinterpreter_refuses)
    gated = suite.run(mechanism, tmp_path, CI_RUN_TIMEOUT_S, suite.ci_sample)
    measured = Measurement(suite, plain, gated, reference)
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{library}-{mechanism}.txt").write_text(measured.report())
    threshold = THRESHOLDS[library, mechanism]
    lost = "\n".join(measured.lost()[:20])
    assert measured.share >= threshold, f"{measured.summary()}; below {threshold:.0%}; first lost:\n{lost}"
