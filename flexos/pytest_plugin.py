"""``pytest --flexos flexos.yaml``: an app's own test suite, run with its image booted.

The image boots before pytest loads the first conftest, so every import the suite makes goes
through the gates; the test modules are the app's code (they stay in the default compartment).
``--flexos-diff`` runs the suite once per mechanism (no flexos, strict fcalls, subinterp,
process), each in a pytest of its own, and reports every test whose outcome differs from the run
without flexos, with the first line that differs. See docs/testing.md.

Registered as the ``flexos`` pytest11 entry point: inert (nothing but this module and the
standard library imported) unless one of its options is given. The config stack is loaded in
the app only; compartments never load pytest or this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from flexos.image import Image
    from flexos.runtime import Runtime

#: What ``--flexos-driver`` may name: every compartment but the default runs on this driver with
#: these options (``plain``: flexos is not booted at all).
MECHANISMS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "plain": None,
    "fcalls-strict": ("fcalls", {"strict": True}),
    "subinterp": ("subinterp", {}),
    "process": ("process", {}),
}
#: The order ``--flexos-diff`` runs them in: the run without flexos first, as the reference.
DIFF_ORDER = tuple(MECHANISMS)

_RUNTIME = pytest.StashKey["Runtime"]()
_OUTCOMES = pytest.StashKey["OutcomeWriter"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flexos", "flexos: the suite with the app's image booted")
    group.addoption("--flexos", metavar="FLEXOS_YAML", help="boot this image before the suite is collected")
    group.addoption(
        "--flexos-driver",
        choices=list(MECHANISMS),
        help="run every compartment but the default on this mechanism (plain: do not boot flexos)",
    )
    group.addoption(
        "--flexos-diff",
        action="store_true",
        help="run the suite once per mechanism and report each test whose outcome differs",
    )
    group.addoption(
        "--flexos-diff-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --flexos-diff: end a mechanism's run after this long (its unfinished tests count as lost)",
    )
    group.addoption("--flexos-outcomes", metavar="FILE", help="write each test's outcome to FILE (JSON lines)")
    group.addoption(
        "--flexos-without",
        action="append",
        default=[],
        metavar="MODULE",
        help="run as if MODULE could not be imported (e.g. a C extension subinterpreters refuse: the "
        "reference a subinterp run is compared with); repeatable",
    )
    group.addoption(
        "--flexos-sample",
        type=int,
        default=1,
        metavar="N",
        help="run about one test in N, the same ones on every run and machine (chosen by a hash of the test id)",
    )


# -- booting the image --------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """Boot before the first conftest: a conftest's imports go through the gates like a test's."""
    options = early_config.known_args_namespace
    for name in options.flexos_without:
        sys.modules[name] = None  # type: ignore[assignment]  # import then raises ImportError, as it would there
    if options.flexos_outcomes and not options.flexos_diff:
        writer = early_config.stash[_OUTCOMES] = OutcomeWriter(Path(options.flexos_outcomes))
        early_config.pluginmanager.register(writer, "flexos-outcomes")
    if options.flexos_diff or not options.flexos or options.flexos_driver == "plain":
        return
    early_config.stash[_RUNTIME] = boot(options.flexos, options.flexos_driver)


def boot(config: str, mechanism: str | None = None) -> Runtime:
    """Boot ``config`` (on ``mechanism``, see :data:`MECHANISMS`), refusing modules it places
    elsewhere that are already imported: they would bypass their gates."""
    from flexos import runtime as flexos_runtime
    from flexos.config import load
    from flexos.drivers import driver_class

    image = load(config)
    if mechanism is not None:
        image = on_mechanism(image, mechanism)
    # Asked before booting, which takes such modules out of sys.modules for later imports: the
    # plugin that imported one still runs it in the app.
    early = sorted(
        name
        for name in list(sys.modules)
        if (owner := image.compartment_of(name)) is not None
        and owner != image.default
        and not driver_class(image.compartments[owner].driver).direct
    )
    if early:
        raise pytest.UsageError(
            f"--flexos {config}: {', '.join(early)} already imported before flexos booted (by a pytest plugin?), "
            "so it would run in the app, not in its compartment; disable that plugin with -p no:NAME"
        )
    runtime = flexos_runtime.boot(image)
    return runtime


def on_mechanism(image: Image, mechanism: str) -> Image:
    """``image`` with every compartment but the default on ``mechanism`` (its default options;
    hardening and ``buffers: view`` kept only where that driver can enforce them)."""
    from flexos.drivers import driver_class
    from flexos.image import Image

    target = MECHANISMS[mechanism]
    if target is None:
        raise ValueError(f"mechanism {mechanism!r} does not boot an image")
    driver, options = target
    hardenable = driver_class(driver).hardenable
    # Views only where that driver lends sealed buffers (elsewhere flexos.config would refuse them).
    sharing = {
        module: declared
        for module, declared in image.library_sharing.items()
        if declared.get("buffers") != "view" or driver_class(driver).buffer_views
    }
    compartments = {
        name: spec
        if spec.default
        else dataclasses.replace(
            spec, driver=driver, options=dict(options), hardening=spec.hardening if hardenable else {}
        )
        for name, spec in image.compartments.items()
    }
    return Image(
        compartments,
        image.libraries,
        f"{image.source} (on {mechanism})",
        image.library_hardening,
        sharing,
        image.origins,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    every = config.option.flexos_sample
    if every <= 1:
        return
    chosen = [item for item in items if in_sample(item.nodeid, every)]
    config.hook.pytest_deselected(items=[item for item in items if not in_sample(item.nodeid, every)])
    items[:] = chosen


def in_sample(nodeid: str, every: int) -> bool:
    """Whether test ``nodeid`` is one of the ``1/every`` that ``--flexos-sample`` runs."""
    return zlib.crc32(nodeid.encode()) % every == 0


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    runtime = config.stash.get(_RUNTIME, None)
    if runtime is not None:
        runtime.stop()
    writer = config.stash.get(_OUTCOMES, None)
    if writer is not None:
        writer.close()


# -- outcomes ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one test ended, and the first line of what it said (its exception, or why it skipped)."""

    outcome: str  # passed, failed, error, skipped, xfailed, xpassed
    line: str = ""


class OutcomeWriter:
    """A pytest plugin that appends each test's outcome as it ends, so that a run that is killed
    still says what it ran."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")
        self._pending: dict[str, Outcome] = {}

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # a module that fails to import loses all its tests
            self._write(report.nodeid, Outcome("error", _first_line(report)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        earlier = self._pending.get(report.nodeid)
        if earlier is None or earlier.outcome == "passed":  # the first phase that did not pass decides
            self._pending[report.nodeid] = _phase_outcome(report)
        if report.when == "teardown":
            self._write(report.nodeid, self._pending.pop(report.nodeid))

    def _write(self, nodeid: str, outcome: Outcome) -> None:
        self._file.write(json.dumps([nodeid, outcome.outcome, outcome.line]) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _phase_outcome(report: pytest.TestReport) -> Outcome:
    """One phase's report as a test outcome (a failing setup or teardown is an error)."""
    if hasattr(report, "wasxfail"):
        return Outcome("xfailed" if report.skipped else "xpassed", str(report.wasxfail))
    if report.passed:
        return Outcome("passed")
    if report.skipped:
        return Outcome("skipped", _first_line(report))
    return Outcome("failed" if report.when == "call" else "error", _first_line(report))


def _first_line(report: pytest.TestReport | pytest.CollectReport) -> str:
    """Where the failure was raised and its message's first line (a skip: its reason)."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return str(longrepr[2])
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        message = crash.message.strip().splitlines()
        path, here = str(crash.path), os.getcwd() + os.sep
        return f"{path.removeprefix(here)}:{crash.lineno}: {message[0] if message else ''}"
    text = str(longrepr).strip().splitlines()
    return text[-1] if text else ""


def read_outcomes(path: Path) -> dict[str, Outcome]:
    """The outcomes a run wrote (a line cut short by a killed run is ignored)."""
    outcomes: dict[str, Outcome] = {}
    if not path.exists():
        return outcomes
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            nodeid, outcome, first = json.loads(line)
            outcomes[nodeid] = Outcome(outcome, first)
    return outcomes


# -- runs, and their differences ----------------------------------------------------------------
@dataclasses.dataclass
class SuiteRun:
    """One run of a suite on one mechanism, in a pytest of its own."""

    mechanism: str
    outcomes: dict[str, Outcome]
    seconds: float
    returncode: int | None  # None: ended at the timeout
    output: str  # the run's last lines (why it ended, when it ended early)

    def passed(self) -> set[str]:
        return {nodeid for nodeid, outcome in self.outcomes.items() if outcome.outcome == "passed"}

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
        return counts

    def summary(self) -> str:
        counts = ", ".join(f"{n} {what}" for what, n in sorted(self.counts().items()))
        ended = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return f"{self.mechanism:14} {counts or 'nothing ran'} ({self.seconds:.1f} s, {ended})"


def run_suite(
    args: Iterable[str],
    mechanism: str,
    config: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    safe_path: bool = bool(sys.flags.safe_path),
) -> SuiteRun:
    """Run ``python -m pytest ARGS`` in a new interpreter on ``mechanism`` (``config``: the
    flexos.yaml; ``plain`` needs none), and collect each test's outcome. ``safe_path``: run it
    with ``-P`` (the working directory is not put first on ``sys.path``)."""
    with tempfile.TemporaryDirectory(prefix="flexos-suite-") as scratch:
        outcomes_file = Path(scratch) / "outcomes.jsonl"
        command = [sys.executable, *(["-P"] if safe_path else []), "-m", "pytest", *args]
        if config is not None:
            command += ["--flexos", config]
        command += ["--flexos-driver", mechanism, "--flexos-outcomes", str(outcomes_file)]
        start = time.monotonic()
        with subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its compartments too are ended at the timeout
        ) as proc:
            try:
                output, _ = proc.communicate(timeout=timeout)
                returncode: int | None = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                returncode = None
        seconds = time.monotonic() - start
        tail = "\n".join(output.decode(errors="replace").splitlines()[-20:])
        return SuiteRun(mechanism, read_outcomes(outcomes_file), seconds, returncode, tail)


def differences(reference: SuiteRun, other: SuiteRun) -> Iterator[tuple[str, Outcome, Outcome]]:
    """(test id, its reference outcome, its outcome in ``other``) for each test that ended
    differently, or that ran in one and not the other (then ``lost``: never reported)."""
    lost = Outcome("lost", "never reported (its module failed to collect, or the run ended first)")
    for nodeid in sorted(reference.outcomes.keys() | other.outcomes.keys()):
        mine, theirs = reference.outcomes.get(nodeid, lost), other.outcomes.get(nodeid, lost)
        if mine.outcome != theirs.outcome:
            yield nodeid, mine, theirs


# -- --flexos-diff ------------------------------------------------------------------------------------
@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    if not config.option.flexos_diff:
        return None
    if not config.option.flexos:
        raise pytest.UsageError("--flexos-diff needs --flexos FLEXOS_YAML (where the app's modules are placed)")
    from flexos.drivers import unavailable

    # A module that fails to collect on one mechanism loses its own tests, not the whole comparison.
    args = [*_without_own_options(list(config.invocation_params.args)), "--continue-on-collection-errors"]
    write = sys.stdout.write
    runs: list[SuiteRun] = []
    for mechanism in DIFF_ORDER:
        target = MECHANISMS[mechanism]
        reason = unavailable(target[0]) if target is not None else None
        if reason is not None:
            write(f"{mechanism:14} skipped: {reason}\n")
            continue
        run = run_suite(
            args,
            mechanism,
            config.option.flexos,
            cwd=config.invocation_params.dir,
            timeout=config.option.flexos_diff_timeout,
        )
        runs.append(run)
        write(run.summary() + "\n")
        if not run.outcomes:
            write(f"  it reported no test; its last lines:\n{run.output}\n")
    differing = 0
    for other in runs[1:]:
        for nodeid, mine, theirs in differences(runs[0], other):
            differing += 1
            write(f"{other.mechanism}: {nodeid}: {mine.outcome} -> {theirs.outcome}\n")
            write(f"    {theirs.line or mine.line}\n")
    write(f"flexos-diff: {differing} outcome(s) differ from the run without flexos\n")
    return 1 if differing or not runs or not runs[0].outcomes else 0


def _without_own_options(args: list[str]) -> list[str]:
    """The command line a mechanism's run gets: the user's, without the options the run sets itself."""
    valued = {"--flexos", "--flexos-driver", "--flexos-outcomes", "--flexos-diff-timeout"}  # each takes a value
    # (--flexos-without stays: each run of the comparison is without those modules)
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in valued:
            skip = True
        elif arg == "--flexos-diff" or arg.split("=", 1)[0] in valued:
            continue
        else:
            kept.append(arg)
    return kept
