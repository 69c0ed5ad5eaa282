"""``flexos trace`` on the reference apps: the proposal checks, runs each app with the same output,
and grants nothing the traced workload can do without (a mutation test: every single permission
removed in turn makes the workload fail).

The workloads are bench/trace_workloads.py's (the smoke workloads of tests/test_apps.py); each app
is traced, then run plainly, under the proposal, and under each mutation of it.
"""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import trace_workloads as workloads

pytestmark = pytest.mark.slow
CLIENTS = {"kv": "redis-benchmark", "kv_sqlite": "redis-benchmark", "http": "wrk", "sqlite_notes": None}
# What each proposal must cut out: the C extension of each app, in a compartment of its own process.
CUT = {"kv": "hiredis", "kv_sqlite": "sqlite3", "http": "httptools", "sqlite_notes": "sqlite3"}
# Where each app's code is imported from (the workloads run it with this on PYTHONPATH).
CODE = {"kv": "apps/kv", "kv_sqlite": "apps/kv", "http": "apps/http", "sqlite_notes": None}


def grants(document: dict) -> list[tuple[str, list, object]]:
    """Every permission a proposal grants, as (what, path into the document, how to take it away)."""
    found: list[tuple[str, list, object]] = []
    for index, compartment in enumerate(document["compartments"]):
        hardening = compartment.get("hardening")
        if not hardening:
            continue
        for item, target in enumerate(compartment.get("reaches") or []):
            found.append((f"{compartment['name']}: reaches {target}", ["compartments", index, "reaches", item], None))
        where = ["compartments", index, "hardening"]
        if hardening.get("env") == "inherit":
            found.append((f"{compartment['name']}: env inherit", [*where, "env"], "clean"))
        if hardening.get("network") == "allow":
            found.append((f"{compartment['name']}: network allow", [*where, "network"], "none"))
        for key in ("read", "write"):
            for item, path in enumerate((hardening.get("filesystem") or {}).get(key, [])):
                found.append(
                    (f"{compartment['name']}: filesystem.{key} {path}", [*where, "filesystem", key, item], None)
                )
        seccomp = hardening.get("seccomp")
        if isinstance(seccomp, dict):
            for item, call in enumerate(seccomp.get("allow", [])):
                found.append((f"{compartment['name']}: seccomp.allow {call}", [*where, "seccomp", "allow", item], None))
    return found


def without(document: dict, path: list, replacement: object) -> dict:
    """``document`` with the grant at ``path`` taken away: replaced, or removed from its list."""
    mutated = copy.deepcopy(document)
    node = mutated
    for key in path[:-1]:
        node = node[key]
    if replacement is None:
        del node[path[-1]]
    else:
        node[path[-1]] = replacement
    return mutated


def dump(document: dict, target: Path) -> None:
    stream = io.StringIO()
    YAML(typ="rt").dump(document, stream)
    target.write_text(stream.getvalue())


@pytest.mark.parametrize("app", list(workloads.WORKLOADS))
def test_the_proposal_runs_the_app_unchanged_and_grants_only_what_it_needs(app, tmp_path):
    if CLIENTS[app] is not None and shutil.which(CLIENTS[app]) is None:
        pytest.skip(f"{CLIENTS[app]} is not installed (scripts/setup installs it)")
    workload = workloads.WORKLOADS[app]
    # Each run has a directory of its own (its database, its log) with its flexos.yaml in it, since
    # flexos reads a relative path in a flexos.yaml from the yaml's directory.
    proposal = tmp_path / "trace" / "flexos.yaml"
    traced = workload([workloads.FLEXOS, "trace", "-o", str(proposal), "--write", "--"], tmp_path / "trace")
    assert traced.status == 0, traced.stderr
    assert "Predicted cost on this machine" in traced.stderr
    code = [str(workloads.REPO / CODE[app])] if CODE[app] else []
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([*code, os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run(
        [workloads.FLEXOS, "check", "-c", str(proposal)], capture_output=True, text=True, timeout=120, env=environment
    )
    assert check.returncode == 0, check.stdout + check.stderr

    document = YAML(typ="rt").load(proposal.read_text())
    placed = {module: entry["compartment"] for module, entry in document["libraries"].items()}
    assert CUT[app] in placed, proposal.read_text()
    cut = next(c for c in document["compartments"] if c["name"] == placed[CUT[app]])
    assert cut["mechanism"]["driver"] == "process" and cut["hardening"]["seccomp"] == "compute-only"

    plain = workload([workloads.PYTHON], tmp_path / "plain")
    copied = tmp_path / "proposal" / "flexos.yaml"
    copied.parent.mkdir()
    shutil.copy(proposal, copied)
    under = workload([workloads.FLEXOS, "run", "-c", str(copied)], tmp_path / "proposal")
    assert plain.status == 0 and under.status == 0, under.stderr
    assert under.output == plain.output == traced.output

    for index, (what, path, replacement) in enumerate(grants(document)):
        mutated = tmp_path / f"mutated-{index}" / "flexos.yaml"
        mutated.parent.mkdir()
        dump(without(document, path, replacement), mutated)
        result = workload([workloads.FLEXOS, "run", "-c", str(mutated)], tmp_path / f"mutated-{index}")
        assert result.status != 0 or result.output != plain.output, f"{app}: without {what!r} the workload still works"
