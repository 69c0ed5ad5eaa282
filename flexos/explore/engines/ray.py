"""The ray engine: benchmark runs on the hosts of a Ray cluster, never two on one host at once.

A host offers benchmark runs by starting its Ray node with the resources :func:`node_resources`
computes from flexos check's probe (``python -m flexos.explore.engines.ray`` prints them): one
``flexos_bench_slot`` and one ``flexos_feature_NAME`` per feature it has. Each run asks for a slot
(so a host runs one benchmark at a time, and the number of hosts bounds the parallelism) and for
the features its configuration needs (so a seccomp or Landlock configuration runs only where the
kernel has them). Without an address the engine starts a Ray of its own on this machine: one host.

The benchmark's directory (the space file's, less the exploration's output) reaches the hosts as
the runtime environment's ``working_dir`` and flexos itself as a ``py_modules`` entry, so every
host runs the driver's code and files; each host needs the same CPython with flexos's dependencies
and ray installed (``pip install 'flexos[cluster]'``). The generated flexos.yaml travels with each
run and is written to a temporary file there, which ``FLEXOS_CONFIG`` names.

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
FEATURE = "flexos_feature_"
PACKAGE = Path(__file__).resolve().parents[2]  # flexos itself, shipped to every host
# A feature resource is asked for in this amount: the slot, not the feature, limits a host to one run.
_SHARE = 0.001


def node_resources() -> dict[str, float]:
    """The Ray resources this machine offers: a benchmark slot and each feature flexos check finds."""
    features = this_host().features
    return {SLOT: 1.0, **{FEATURE + name: 1.0 for name, available in sorted(features.items()) if available}}


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
        runtime_env = {
            "working_dir": str(bench.directory),
            "excludes": list(bench.exclude),
            "py_modules": [str(PACKAGE)],
        }
        options: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
        if address is None:  # this machine alone: nothing of this Ray needs to be reached from elsewhere
            options.update(resources=node_resources(), include_dashboard=False, _node_ip_address="127.0.0.1")
        else:
            options["address"] = address
        ray.init(**options)
        self._task = ray.remote(num_cpus=0, max_retries=0)(_run_on_host)
        self._running: dict[ray.ObjectRef, Job] = {}
        if not self.hosts():
            ray.shutdown()
            raise FlexosError(
                f"no host of the Ray cluster at {address} offers a benchmark slot; start each host's node with "
                'ray start --resources "$(python -m flexos.explore.engines.ray)" (docs/explore.md)'
            )

    def _nodes(self) -> list[dict[str, Any]]:
        return [node for node in ray.nodes() if node["Alive"] and node["Resources"].get(SLOT)]

    def hosts(self) -> int:
        return len(self._nodes())

    def busy(self) -> int:
        return len(self._running)

    def _resources(self, job: Job) -> dict[str, float]:
        wanted = {SLOT: 1.0, **{FEATURE + name: _SHARE for name in job.needs}}
        if not any(all(node["Resources"].get(r, 0) >= n for r, n in wanted.items()) for node in self._nodes()):
            offered = {r for node in self._nodes() for r in node["Resources"]}
            have = sorted(r.removeprefix(FEATURE) for r in offered if r.startswith(FEATURE))
            raise FlexosError(
                f"{self.bench.source}: {job.name} needs {', '.join(sorted(job.needs))}, which no host of the cluster "
                f"offers (they offer: {', '.join(have) or 'nothing'}); add a host that has it or remove the toggle"
            )
        return wanted

    def run(self, jobs: Sequence[Job], skip: Callable[[Job], bool]) -> Generator[Done | Lost]:
        waiting = deque(jobs)
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
                ready, _ = ray.wait(list(self._running), num_returns=1)
                job = self._running.pop(ready[0])
                try:
                    outcome: Done | Lost = ray.get(ready[0])
                except ray.exceptions.RayTaskError:
                    raise  # flexos's own code failed on the host: a bug to see, not a host to replace
                except ray.exceptions.RayError as lost:
                    waiting.appendleft(job)
                    outcome = Lost(job, str(lost).strip().splitlines()[0])
                yield outcome
        finally:
            for running in self._running:
                ray.cancel(running, force=True)
            self._running.clear()

    def close(self) -> None:
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(node_resources()))
