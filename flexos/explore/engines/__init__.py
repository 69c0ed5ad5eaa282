"""Where benchmark runs happen: one small interface, one module per engine.

An :class:`Engine` is made for one benchmark (:class:`Bench`: the command and the directory it
runs in), is given jobs (one run of one configuration each) and yields each outcome as it
finishes: :class:`Done` (a value or a failure, and the host it ran on) or :class:`Lost` (the host
died mid-run; the engine runs the job again elsewhere). ``local`` runs them one after another on
this machine, as flexos explore always did; ``ray`` runs one at a time per host of a Ray cluster.
Another scheduler (Dask, a batch system) is one more module with the four methods of
:class:`Engine`, named in :func:`make_engine`.

The benchmark contract is the same everywhere (:func:`run_benchmark`): the command runs through
``/bin/sh`` with ``FLEXOS_CONFIG`` (the generated flexos.yaml), ``FLEXOS_REPEAT`` (the run's
number) and ``FLEXOS_NODE`` (the host as the engine knows it) set, and the interpreter's ``bin``
directory first on ``PATH``; the last line of its stdout is the metric.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

from flexos.errors import FlexosError

EngineName = Literal["local", "ray"]
ENGINES: tuple[str, ...] = get_args(EngineName)


class BenchmarkFailed(FlexosError):
    """The benchmark command failed or printed no metric; ``reason`` says why in one line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses to the driver from a remote host
        return type(self), (str(self), self.reason)


@dataclass(frozen=True)
class Job:
    """One run of one configuration."""

    index: int  # the configuration's index in the space
    run: int  # FLEXOS_REPEAT
    name: str  # the configuration's name
    config: str  # the generated flexos.yaml, as text (shipped to remote hosts)
    path: Path  # where it is written on this machine (local runs and messages)
    drivers: frozenset[str] = frozenset()  # the drivers of its compartments: the host must be able to run them
    features: frozenset[str] = frozenset()  # machine features (flexos check's names) its hardening needs


@dataclass(frozen=True)
class Host:
    """A machine that runs benchmarks, as results record it."""

    node: str  # the engine's name for it (a Ray node id; "local")
    hostname: str
    cpu: str
    kernel: str
    python: str
    flexos: str  # flexos's version there
    features: dict[str, bool] = field(default_factory=dict)  # flexos check's probe: feature -> available
    drivers: tuple[str, ...] = ()  # the drivers that can run there

    def record(self) -> dict[str, object]:
        """What results record of the host (everything but the engine's name for it)."""
        record = dataclasses.asdict(self)
        del record["node"]
        return record


@dataclass(frozen=True)
class Done:
    job: Job
    host: Host
    value: float | None  # the metric, or None when the run failed
    failure: BenchmarkFailed | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Lost:
    """The host died while running ``job``; the engine runs it again elsewhere."""

    job: Job
    reason: str


@dataclass(frozen=True)
class Bench:
    """The benchmark of one exploration, as every engine runs it."""

    command: str
    directory: Path  # where it runs: the space file's directory (shipped to remote hosts)
    timeout: float
    source: Path  # the space file, for messages
    exclude: tuple[str, ...] = ()  # paths under ``directory`` not shipped (the exploration's output)

    def where(self, job: Job) -> str:
        return f"{self.source}: benchmark for {job.name} (run {job.run + 1}, config {job.path})"


class Engine(Protocol):
    """Runs the jobs of one :class:`Bench` somewhere, at most one per host at a time."""

    bench: Bench

    def hosts(self) -> int:
        """How many hosts can run a job (the search proposes this many configurations at once)."""
        ...

    def busy(self) -> int:
        """How many hosts are running a job now."""
        ...

    def run(self, jobs: Sequence[Job], skip: Callable[[Job], bool]) -> Generator[Done | Lost]:
        """Run ``jobs`` (dropping those not yet started for which ``skip`` says True), yielding each
        outcome as it finishes; closing the iterator abandons what is still running."""
        ...

    def close(self) -> None: ...


def make_engine(name: str, bench: Bench, address: str | None = None) -> Engine:
    """The engine called ``name``: ``local``, or ``ray`` (on the cluster at ``address``, else a
    Ray of its own on this machine)."""
    if name == "local":
        from flexos.explore.engines.local import LocalEngine

        return LocalEngine(bench)
    if name == "ray":
        try:
            from flexos.explore.engines.ray import RayEngine
        except ModuleNotFoundError as missing:
            if (missing.name or "").partition(".")[0] != "ray":
                raise
            raise FlexosError(
                "the ray engine needs ray, which this install lacks: pip install 'flexos[cluster]'"
            ) from None
        return RayEngine(bench, address)
    raise ValueError(f"unknown engine {name!r} (known: {', '.join(ENGINES)})")


@functools.cache
def this_host(node: str = "local") -> Host:
    """This machine: its name, CPU model, kernel, Python, flexos, what flexos check's probe finds
    and which drivers can run (probed once)."""
    from flexos import drivers
    from flexos.probe import machine_report

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    features = {feature.name: feature.available for feature in machine_report()}
    runnable = tuple(name for name in drivers.names() if drivers.unavailable(name) is None)
    try:
        version = importlib.metadata.version("flexos")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"  # run from a source tree
    python = platform.python_version()
    return Host(node, socket.gethostname(), cpu, platform.release(), python, version, features, runnable)


def run_benchmark(command: str, cwd: Path, config: Path, run: int, timeout: float, node: str, where: str) -> float:
    """Run the benchmark command once for the configuration written at ``config``; its metric.

    ``where`` starts every error message (the space file, the configuration, the run)."""
    env = {
        **os.environ,
        "FLEXOS_CONFIG": str(config),
        "FLEXOS_REPEAT": str(run),
        "FLEXOS_NODE": node,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    try:
        done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchmarkFailed(
            f"{where}: still running after {timeout:g} s; raise benchmark.timeout or shorten the run",
            f"still running after {timeout:g} s",
        ) from None
    if done.returncode != 0:
        output = done.stderr or done.stdout
        raise BenchmarkFailed(
            f"{where}: the command exited with status {done.returncode}; its last output:\n" + _tail(output),
            f"exit status {done.returncode}: {_tail(output, 1)}",
        )
    lines = done.stdout.strip().splitlines()
    last = lines[-1].strip() if lines else ""
    try:
        value = float(last)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BenchmarkFailed(
            f"{where}: the last line of its stdout must be the metric (a finite number), got {last!r}",
            f"printed no metric (last line {last!r})",
        )
    return value


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(nothing)"
