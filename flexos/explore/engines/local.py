"""The local engine: every run on this machine, one after another (flexos explore's default)."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence

from flexos.explore.engines import Bench, BenchmarkFailed, Done, Job, Lost, run_benchmark, this_host


class LocalEngine:
    """This machine is the one host."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self._running = False

    def hosts(self) -> int:
        return 1

    def busy(self) -> int:
        return int(self._running)

    def run(self, jobs: Sequence[Job], skip: Callable[[Job], bool]) -> Generator[Done | Lost]:
        host = this_host()
        for job in jobs:
            if skip(job):
                continue
            started = time.monotonic()
            self._running = True
            try:
                value = run_benchmark(
                    self.bench.command,
                    self.bench.directory,
                    job.path,
                    job.run,
                    self.bench.timeout,
                    host.node,
                    self.bench.where(job),
                )
            except BenchmarkFailed as failed:
                yield Done(job, host, None, failed, time.monotonic() - started)
                continue
            finally:
                self._running = False
            yield Done(job, host, value, None, time.monotonic() - started)

    def close(self) -> None:
        """Nothing outlives a run here."""
