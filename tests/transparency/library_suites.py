"""Real libraries' own test suites, unchanged, with the library in another compartment (issue 13).

Each library is installed at its pinned version (constraints.txt); its test suite comes from its
PyPI sdist at the same version (suites.txt, with hashes), which ``scripts/setup`` fetches into
flexos's cache (``python tests/transparency/library_suites.py fetch``). A suite runs with
``pytest --flexos`` (flexos/pytest_plugin.py): the library in compartment ``lib``, the test
modules in the app, once without flexos and once per mechanism, each in a pytest of its own.

    python tests/transparency/library_suites.py measure [LIBRARY...]   # the table, and what is lost
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from flexos.pytest_plugin import SuiteRun, differences, run_suite

HERE = Path(__file__).parent
MANIFEST = HERE / "suites.txt"
SUITES_DIR = Path(
    os.environ.get("FLEXOS_SUITES")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flexos/suites"
)
#: The mechanisms the library is placed on (the run without flexos is the reference).
MECHANISMS = ("process", "subinterp")
#: A test that takes longer than this (seconds) fails, and the suite goes on.
TEST_TIMEOUT_S = 5
#: A whole run (one suite on one mechanism) ends after this long; the tests it did not reach are lost.
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LibrarySuite:
    """One library and how its suite is run: from its sdist's directory, with ``args``."""

    name: str
    sdist: str  # the directory the sdist unpacks to
    args: tuple[str, ...]
    #: Where its modules go: ``lib`` (the compartment the mechanism backs) or ``app``.
    libraries: dict[str, str] = field(default_factory=dict)
    #: CI runs about one test in this many (``--flexos-sample``), the same ones every time.
    ci_sample: int = 1
    #: Its C extensions that refuse to load in a subinterpreter (checked: :func:`refused_by_subinterpreters`).
    #: Under ``subinterp`` the library runs without them, as it does in a subinterpreter without
    #: flexos, so the run it is compared with is the plain one without them too.
    subinterpreter_refuses: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return SUITES_DIR / self.sdist

    def flexos_yaml(self, where: Path) -> Path:
        """The image the suite runs under: the app, and the library in ``lib`` (on process; the
        run's ``--flexos-driver`` puts ``lib`` on the mechanism measured)."""
        lines = [
            "compartments:",
            "  - name: app",
            "    mechanism: {driver: fcalls}",
            "    default: true",
            "  - name: lib",
            "    mechanism: {driver: process}",
            "libraries:",
            *(f"  {module}: {{compartment: {compartment}}}" for module, compartment in self.libraries.items()),
        ]
        path = where / f"{self.name}.flexos.yaml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def run(
        self,
        mechanism: str,
        where: Path,
        timeout: float = RUN_TIMEOUT_S,
        sample: int = 1,
        without: tuple[str, ...] = (),
    ) -> SuiteRun:
        """One run of the suite (about one test in ``sample``) on ``mechanism`` (or ``plain``),
        ``without`` those modules importable."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: the {self.name} test suite is not fetched; run scripts/setup")
        # A module that fails to collect loses its own tests, not the whole run's.
        args = ["-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
        args += [f"--timeout={TEST_TIMEOUT_S}", "--timeout-method=signal"]
        args += [f"--flexos-sample={sample}", *(f"--flexos-without={name}" for name in without), *self.args]
        config = None if mechanism == "plain" else str(self.flexos_yaml(where))
        # -P: a source tree in the sdist's directory must not shadow the installed library.
        return run_suite(args, mechanism, config, cwd=self.directory, timeout=timeout, safe_path=True)


SUITES = {
    suite.name: suite
    for suite in (
        # The tests are the package's own subpackage: simplejson.tests stays in the app.
        LibrarySuite(
            "simplejson",
            "simplejson-4.3.0",
            ("--pyargs", "simplejson.tests"),
            {"simplejson": "lib", "simplejson.tests": "app"},
            subinterpreter_refuses=("simplejson._speedups",),
        ),
        LibrarySuite("markupsafe", "markupsafe-3.0.4", ("tests",), {"markupsafe": "lib"}),
        LibrarySuite(
            "pyyaml",
            "pyyaml-6.0.4",
            ("tests",),
            {"yaml": "lib", "_yaml": "lib"},
            ci_sample=20,
            subinterpreter_refuses=("yaml._yaml",),
        ),
        # Its conftest marks tests with pytest-cov's no_cover, and its filterwarnings turn the
        # unknown mark into an error at collection (its CI has pytest-cov, which we do not need).
        LibrarySuite(
            "dateutil",
            "python_dateutil-4.0.0",
            ("-W", "ignore::pytest.PytestUnknownMarkWarning", "tests"),
            {"dateutil": "lib"},
            ci_sample=50,
        ),
    )
}


def refused_by_subinterpreters(module: str) -> bool:
    """Whether importing ``module`` in an own-GIL subinterpreter, without flexos, fails because
    the extension does not support subinterpreters (what excuses its tests under ``subinterp``)."""
    probe = (
        "import _interpreters, sys\n"
        "interp = _interpreters.create('isolated')\n"
        f"failure = _interpreters.exec(interp, 'import {module}')\n"
        "sys.exit(0 if failure is not None and 'does not support loading in subinterpreters' in failure.msg else 1)\n"
    )
    return subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0


@dataclass
class Measurement:
    """One suite on one mechanism, against the run without flexos (``reference``: the run without
    flexos and without the extensions the mechanism cannot load, if any)."""

    suite: LibrarySuite
    plain: SuiteRun
    gated: SuiteRun
    reference: SuiteRun | None = None

    @property
    def compared_with(self) -> SuiteRun:
        return self.reference or self.plain

    @property
    def kept(self) -> int:
        return len(self.compared_with.passed() & self.gated.passed())

    @property
    def share(self) -> float:
        return self.kept / max(1, len(self.compared_with.passed()))

    def lost(self) -> list[str]:
        """Each test that passes in the reference and not on the mechanism, with its first line."""
        passing = self.compared_with.passed()
        return [
            f"{nodeid}: {theirs.outcome}: {theirs.line}"
            for nodeid, _mine, theirs in differences(self.compared_with, self.gated)
            if nodeid in passing
        ]

    def summary(self) -> str:
        plain_kept = len(self.plain.passed() & self.gated.passed())
        line = (
            f"{self.suite.name:11} {self.gated.mechanism:10} {plain_kept:5} of {len(self.plain.passed()):5} "
            f"plain passes ({plain_kept / max(1, len(self.plain.passed())):.0%}); plain {self.plain.seconds:.0f} s, "
            f"{self.gated.mechanism} {self.gated.seconds:.0f} s"
            + (" (timed out)" if self.gated.returncode is None else "")
        )
        if self.reference is not None:
            line += (
                f"\n{'':22} {self.kept:5} of {len(self.reference.passed()):5} passes without "
                f"{', '.join(self.suite.subinterpreter_refuses)} ({self.share:.0%}), as the library loads there"
            )
        return line

    def report(self) -> str:
        return "\n".join([self.summary(), *(f"  {line}" for line in self.lost())]) + "\n"


def fetch() -> None:
    """Download the sdists in suites.txt (hash-checked by pip) and unpack each once."""
    SUITES_DIR.mkdir(parents=True, exist_ok=True)
    if all(suite.directory.is_dir() for suite in SUITES.values()):
        return
    with tempfile.TemporaryDirectory(dir=SUITES_DIR) as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["--require-hashes", "-r", str(MANIFEST), "-d", download],
            check=True,
        )
        for archive in Path(download).glob("*.tar.gz"):
            with tarfile.open(archive) as tar:
                tar.extractall(SUITES_DIR, filter="data")
    missing = [suite.sdist for suite in SUITES.values() if not suite.directory.is_dir()]
    if missing:
        raise SystemExit(f"fetched, yet not found under {SUITES_DIR}: {', '.join(missing)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("fetch", help="fetch the suites (scripts/setup does)")
    measure = commands.add_parser("measure", help="run the suites and print what each mechanism keeps")
    measure.add_argument("libraries", nargs="*", metavar="LIBRARY", help=f"of {', '.join(SUITES)} (default: all)")
    measure.add_argument("--mechanism", action="append", choices=MECHANISMS)
    measure.add_argument("--timeout", type=float, default=RUN_TIMEOUT_S, help="seconds per run")
    measure.add_argument("--ci", action="store_true", help="only the sample CI runs (each suite's ci_sample)")
    options = parser.parse_args()
    if options.command == "fetch":
        fetch()
        return
    unknown = sorted(set(options.libraries) - set(SUITES))
    if unknown:
        parser.error(f"unknown library {', '.join(unknown)} (known: {', '.join(SUITES)})")
    with tempfile.TemporaryDirectory() as scratch:
        for name in options.libraries or list(SUITES):
            suite = SUITES[name]
            sample = suite.ci_sample if options.ci else 1
            plain = suite.run("plain", Path(scratch), options.timeout, sample)
            print(plain.summary(), flush=True)
            for mechanism in options.mechanism or MECHANISMS:
                gated = suite.run(mechanism, Path(scratch), options.timeout, sample)
                reference = None
                if mechanism == "subinterp" and suite.subinterpreter_refuses:
                    without = suite.subinterpreter_refuses
                    reference = suite.run("plain", Path(scratch), options.timeout, sample, without)
                print(Measurement(suite, plain, gated, reference).report(), flush=True)


if __name__ == "__main__":
    main()
