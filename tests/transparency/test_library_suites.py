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
from library_suites import MECHANISMS, SUITES, LibrarySuite, Measurement

from flexos.pytest_plugin import SuiteRun

#: The least share of the plainly passing tests that must pass with the library on the mechanism,
#: per library and mechanism, on the CI sample. Issue 13's goal is 0.95 for each. Today's values
#: (2026-12-02, before the gate object model's fixes) sit under what the CI sample kept then, with
#: room for runs the timeout cuts short (a failing test costs ~1.5 s today, and a stalled one 5 s):
#: simplejson 0% (its tests, simplejson.tests, do not import under a placed simplejson), MarkupSafe
#: 62% / 65% (14% once, when a run stalled), PyYAML 24% / 28% (runs cut at the timeout),
#: python-dateutil 0% / 0%. Raise each as the fixes land.
THRESHOLDS: dict[tuple[str, str], float] = {
    ("simplejson", "process"): 0.0,
    ("simplejson", "subinterp"): 0.0,
    ("markupsafe", "process"): 0.10,
    ("markupsafe", "subinterp"): 0.55,
    ("pyyaml", "process"): 0.15,
    ("pyyaml", "subinterp"): 0.15,
    ("dateutil", "process"): 0.0,
    ("dateutil", "subinterp"): 0.0,
}
#: One run (a suite's sample on one mechanism) ends after this long; what it did not reach is lost.
CI_RUN_TIMEOUT_S = 20.0
REPORTS = Path(__file__).parents[2] / "results" / "transparency"

_plain_runs: dict[str, SuiteRun] = {}


def plain_run(suite: LibrarySuite, where: Path) -> SuiteRun:
    """The suite's sample without flexos, run once per session (the reference of both mechanisms)."""
    if suite.name not in _plain_runs:
        run = suite.run("plain", where, sample=suite.ci_sample)
        assert run.passed(), f"{suite.name}'s suite passes nothing without flexos:\n{run.output}"
        _plain_runs[suite.name] = run
    return _plain_runs[suite.name]


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("library", list(SUITES))
def test_the_librarys_own_suite_passes_with_the_library_in_a_compartment(
    library: str, mechanism: str, tmp_path: Path
) -> None:
    suite = SUITES[library]
    plain = plain_run(suite, tmp_path)
    measured = Measurement(suite, plain, suite.run(mechanism, tmp_path, CI_RUN_TIMEOUT_S, suite.ci_sample))
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / f"{library}-{mechanism}.txt").write_text(measured.report())
    threshold = THRESHOLDS[library, mechanism]
    lost = "\n".join(measured.lost()[:20])
    assert measured.share >= threshold, f"{measured.summary()}; below {threshold:.0%}; first lost:\n{lost}"
