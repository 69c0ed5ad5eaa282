"""The ray engine: benchmark runs on the hosts of a Ray cluster, never two on one host at once.

A host offers benchmark runs by starting its Ray node with the resources :func:`node_resources`
computes there (``python -m flexos.explore.engines.ray`` prints them): one ``flexos_bench_slot``,
one ``flexos_driver_NAME`` per driver that can run there and one ``flexos_feature_NAME`` per
feature flexos check's probe finds. Each run asks for a slot (so a host runs one benchmark at a
time, and the number of hosts bounds the parallelism), for its configuration's drivers and for
the features its hardening needs (so a seccomp or Landlock configuration runs only where the
kernel has them). A node without a slot (a head started plainly) runs no benchmark. Without an
address the engine starts a Ray of its own on this machine, bound to 127.0.0.1: one host.

The benchmark's directory (the space file's, less the exploration's output and what its
.gitignore names) reaches the hosts as the job's runtime environment ``working_dir``, where the
command runs; each host needs the same CPython with flexos and ray installed (``pip install
'flexos[cluster]'``, the same version: results record it). The generated flexos.yaml travels with
each run and is written to a temporary file there, which ``FLEXOS_CONFIG`` names.

A run whose host dies is reported :class:`~flexos.explore.engines.Lost` and submitted again; Ray
places it on a host that is still there.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import ray

from flexos.errors import FlexosError
from flexos.explore.engines import Bench, BenchmarkFailed, Done, Job, Lost, run_benchmark, this_host

SLOT = "flexos_bench_slot"
DRIVER = "flexos_driver_"
FEATURE = "flexos_feature_"
# A driver or feature is asked for in this amount: the slot, not the feature, limits a host to one run.
_SHARE = 0.001
# How often a wait for runs looks whether the hosts that could run them are still there.
_CHECK_SECONDS = 5.0


def node_resources() -> dict[str, float]:
    """The Ray resources this machine offers: a benchmark slot, its drivers and its features."""
    host = this_host()
    return {
        SLOT: 1.0,
        **{DRIVER + name: 1.0 for name in host.drivers},
        **{FEATURE + name: 1.0 for name, available in sorted(host.features.items()) if available},
    }


def _run_on_host(job: Job, command: str, timeout: float, where: str) -> Done:
    """On the host: write the configuration, run the benchmark in the shipped directory."""
    node = ray.get_runtime_context().get_node_id()
    host = this_host(node)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="flexos-explore-") as directory:
        config = Path(directory) / f"{job.name}.yaml"
        config.write_text(job.config)
        try:
            value = run_benchmark(command, Path.cwd(), config, job.run, timeout, node, where)
        except BenchmarkFailed as failed:
            return Done(job, host, None, failed, time.monotonic() - started)
    return Done(job, host, value, None, time.monotonic() - started)


class RayEngine:
    """Runs jobs as Ray tasks that each hold one host's benchmark slot."""

    def __init__(self, bench: Bench, address: str | None = None) -> None:
        self.bench = bench
        runtime_env = {"working_dir": str(bench.directory), "excludes": list(bench.exclude)}
        options: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
        if address is None:  # a new Ray on this machine alone (not one ray start left running here)
            options.update(
                address="local", resources=node_resources(), include_dashboard=False, _node_ip_address="127.0.0.1"
            )
        else:
            options["address"] = address
        ray.init(**options)
        self._task = ray.remote(num_cpus=0, max_retries=0)(_run_on_host)
        self._running: dict[ray.ObjectRef, Job] = {}
        self._alive: list[dict[str, Any]] | None = None
        if not self.hosts():
            ray.shutdown()
            raise FlexosError(
                f"no host of the Ray cluster at {address} offers a benchmark slot; start each host's node with "
                'ray start --resources "$(python -m flexos.explore.engines.ray)" (docs/explore.md)'
            )

    def _nodes(self, refresh: bool = False) -> list[dict[str, Any]]:
        """The live nodes that offer a benchmark slot, as last asked of the cluster (``refresh``: ask now)."""
        if refresh or self._alive is None:
            self._alive = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get(SLOT)]
        return self._alive

    def hosts(self) -> int:
        return len(self._nodes())

    def busy(self) -> int:
        return len(self._running)

    def _resources(self, job: Job) -> dict[str, float]:
        """What ``job`` asks of its host; FlexosError if no host of the cluster offers it."""
        wanted = {
            SLOT: 1.0,
            **{DRIVER + name: _SHARE for name in job.drivers},
            **{FEATURE + name: _SHARE for name in job.features},
        }

        def offered(nodes: list[dict[str, Any]]) -> bool:
            return any(all(node["Resources"].get(r, 0) >= n for r, n in wanted.items()) for node in nodes)

        if not offered(self._nodes()) and not offered(self._nodes(refresh=True)):
            nodes = self._nodes()
            have = sorted({r for node in nodes for r in node["Resources"] if r.startswith((DRIVER, FEATURE))})
            needs = sorted([*(f"driver {d}" for d in job.drivers), *job.features])
            raise FlexosError(
                f"{self.bench.source}: {job.name} needs {', '.join(needs)}, which no host of the cluster offers "
                f"together ({len(nodes)} hosts are up; they offer: "
                f"{', '.join(r.removeprefix(DRIVER).removeprefix(FEATURE) for r in have) or 'nothing'}); "
                "add a host that has it or leave the driver or toggle out of the space"
            )
        return wanted

    def run(self, jobs: Sequence[Job], skip: Callable[[Job], bool]) -> Generator[Done | Lost]:
        waiting = deque(jobs)
        self._nodes(refresh=True)
        try:
            while waiting or self._running:
                while waiting and len(self._running) < max(self.hosts(), 1):
                    job = waiting.popleft()
                    if not skip(job):
                        task = self._task.options(resources=self._resources(job))
                        bench = self.bench
                        self._running[task.remote(job, bench.command, bench.timeout, bench.where(job))] = job
                if not self._running:
                    continue
                ready, _ = ray.wait(list(self._running), num_returns=1, timeout=_CHECK_SECONDS)
                if not ready:  # still running, or waiting for a host that is gone
                    self._nodes(refresh=True)
                    for job in self._running.values():
                        self._resources(job)
                    continue
                job = self._running.pop(ready[0])
                try:
                    outcome: Done | Lost = ray.get(ready[0])
                except ray.exceptions.RayTaskError:
                    raise  # flexos's own code failed on the host: a bug to see, not a host to replace
                except ray.exceptions.RayError as lost:
                    waiting.appendleft(job)
                    outcome = Lost(job, str(lost).strip().splitlines()[0])
                    self._nodes(refresh=True)  # its host may be gone
                yield outcome
        finally:
            for running in self._running:
                ray.cancel(running, force=True)
            self._running.clear()

    def close(self) -> None:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(node_resources()))
