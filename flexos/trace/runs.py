"""The records of learning runs, kept in one file and merged into one picture.

``flexos trace -o flexos.yaml`` keeps every run it made in ``flexos.trace.json`` beside the
output (``--runs FILE`` elsewhere): a proposal is always made from all of them, so the app's own
run and a run of its tests together decide what each compartment needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexos.errors import FlexosError
from flexos.trace.recorder import RECORD_VERSION

KINDS = ("files", "env", "sockets", "processes", "events")


class TraceError(FlexosError):
    """A trace that cannot go on (no run to learn from, a run that left no record, runs of another format)."""


@dataclass(frozen=True)
class Observation:
    """Something a run did ``count`` times, with the units on the stack (innermost first)."""

    kind: str  # one of KINDS
    key: tuple  # files: (access, path, via); env: (name, set); sockets: (event, family, address); ...
    chain: tuple[str, ...]
    count: int
    site: str | None  # FILE:LINE of the innermost unit frame, as the run reported it
    run: int  # index into Runs.runs


@dataclass(frozen=True)
class Site:
    callee: str
    file: str | None
    line: int | None
    count: int
    run: int


@dataclass
class Edge:
    """Calls from one unit into another, summed over runs."""

    caller: str
    callee: str
    calls: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    sites: list[Site] = field(default_factory=list)
    per_run: dict[int, tuple[int, int, float, float]] = field(default_factory=dict)
    # run index -> (calls, bytes, CPU second of the first call, of the last) in that run


@dataclass(frozen=True)
class UnitInfo:
    name: str
    kind: str  # app, third-party, stdlib
    modules: tuple[str, ...]
    extensions: tuple[str, ...]  # its modules that are native code


@dataclass(frozen=True)
class Run:
    """One learning run, as its recorder wrote it."""

    data: dict[str, Any]

    @property
    def command(self) -> list[str]:
        return list(self.data["command"])

    @property
    def cwd(self) -> str:
        return str(self.data["cwd"])

    @property
    def always_readable(self) -> tuple[str, ...]:
        return tuple(os.path.abspath(p) for p in self.data["always_readable"])

    @property
    def sys_path(self) -> tuple[str, ...]:
        return tuple(self.data["sys_path"])

    def describe(self) -> str:
        """``python -m kv --port 6399`` (exit 0, 1.2 s, 0.8 s of CPU)."""
        data = self.data
        how = "ended by a signal" if data["interrupted"] else f"exit {data['status']}"
        took = f"{data['wall_seconds']:.1f} s, {data['cpu_seconds']:.2f} s of CPU"
        return f"python {' '.join(self.command)}  ({how}, {took})"


class Runs:
    """Every recorded run, and their merged observations."""

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self.runs = list(runs)

    # -- the file -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path) -> Runs:
        if not path.exists():
            return cls()
        document = json.loads(path.read_text())
        if document.get("version") != RECORD_VERSION:
            raise TraceError(
                f"{path}: runs recorded by another version of flexos trace (format {document.get('version')}, "
                f"this one reads {RECORD_VERSION}); trace again with --fresh"
            )
        return cls(Run(data) for data in document["runs"])

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"version": RECORD_VERSION, "runs": [run.data for run in self.runs]}, indent=0))

    def add(self, data: dict[str, Any]) -> None:
        self.runs.append(Run(data))

    # -- merged ---------------------------------------------------------------------------------
    def units(self) -> dict[str, UnitInfo]:
        merged: dict[str, dict[str, Any]] = {}
        for run in self.runs:
            for name, unit in run.data["units"].items():
                entry = merged.setdefault(name, {"kind": unit["kind"], "modules": set(), "extensions": set()})
                entry["modules"].update(unit["modules"])
                entry["extensions"].update(unit["extensions"])
        return {
            name: UnitInfo(name, u["kind"], tuple(sorted(u["modules"])), tuple(sorted(u["extensions"])))
            for name, u in merged.items()
        }

    def edges(self) -> dict[tuple[str, str], Edge]:
        merged: dict[tuple[str, str], Edge] = {}
        for index, run in enumerate(self.runs):
            for data in run.data["edges"]:
                key = (data["caller"], data["callee"])
                edge = merged.setdefault(key, Edge(*key))
                edge.calls += data["calls"]
                edge.bytes_in += data["bytes_in"]
                edge.bytes_out += data["bytes_out"]
                edge.per_run[index] = (
                    data["calls"],
                    data["bytes_in"] + data["bytes_out"],
                    data["cpu_first"],
                    data["cpu_last"],
                )
                edge.sites.extend(Site(s["callee"], s["file"], s["line"], s["count"], index) for s in data["sites"])
        for edge in merged.values():
            edge.sites.sort(key=lambda site: -site.count)
        return merged

    def observations(self, kind: str) -> Iterator[Observation]:
        for index, run in enumerate(self.runs):
            for item in run.data[kind]:
                yield Observation(kind, tuple(item["key"]), tuple(item["chain"]), item["count"], item["site"], index)

    def uses(self) -> dict[str, dict[str, str]]:
        """unit -> other unit -> a module of the first that names the second, over every run."""
        merged: dict[str, dict[str, str]] = {}
        for run in self.runs:
            for unit, others in run.data.get("uses", {}).items():
                for other, module in others.items():
                    merged.setdefault(unit, {}).setdefault(other, module)
        return merged

    def imported_by(self, module: str) -> str | None:
        """``UNIT at FILE:LINE``: who first imported ``module`` in these runs (None: not seen)."""
        for index, run in enumerate(self.runs):
            found = run.data["imports"].get(module)
            if found is not None and found["site"] is not None:
                path, _, line = found["site"].rpartition(":")
                who = found["chain"][0] if found["chain"] else "__main__"
                return f"{who} at {self.short(path, index)}:{line}"
        return None

    def short(self, path: str | None, run: int) -> str:
        """``path`` as a reader wants it: relative to the run's directory or to its ``sys.path`` entry."""
        if path is None:
            return "?"
        roots = [self.runs[run].cwd, *sorted(self.runs[run].sys_path, key=len, reverse=True)]
        for root in roots:
            if root and path.startswith(root.rstrip("/") + "/"):
                return path[len(root.rstrip("/")) + 1 :]
        return path
