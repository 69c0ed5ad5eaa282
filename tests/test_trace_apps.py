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
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from ruamel.yaml import YAML

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import trace_workloads as workloads

from flexos.trace.propose import DENIABLE

pytestmark = pytest.mark.slow
CLIENTS = {"kv": "redis-benchmark", "kv_sqlite": "redis-benchmark", "http": "wrk", "sqlite_notes": None}
# What each proposal must cut out: the C extension of each app, in a compartment of its own process.
CUT = {"kv": "hiredis", "kv_sqlite": "sqlite3", "http": "httptools", "sqlite_notes": "sqlite3"}
# Where each app's code is imported from (the workloads run it with this on PYTHONPATH).
CODE = {"kv": "apps/kv", "kv_sqlite": "apps/kv", "http": "apps/http", "sqlite_notes": None}


Mutation = Callable[[dict], None]


def _remove(*path: object) -> Mutation:
    """Take away the list item (or key) at ``path``."""

    def mutate(document: dict) -> None:
        node = document
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(value: object, *path: object) -> Mutation:
    def mutate(document: dict) -> None:
        node = document
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop_kept(where: list, item: int, count: int) -> Mutation:
    """One variable fewer in ``env: {keep: [...]}`` (the last one gone: ``env: clean``)."""
    return _set("clean", *where, "env") if count == 1 else _remove(*where, "env", "keep", item)


def grants(document: dict) -> list[tuple[str, Mutation]]:
    """Every permission a proposal grants, each as (what, how to take it away): a compartment it
    reaches, each kept variable, each path, each system call, the network, and each audit event
    family it is not denied."""
    found: list[tuple[str, Mutation]] = []
    for index, compartment in enumerate(document["compartments"]):
        hardening = compartment.get("hardening")
        if not hardening:
            continue
        name = compartment["name"]
        for item, target in enumerate(compartment.get("reaches") or []):
            found.append((f"{name}: reaches {target}", _remove("compartments", index, "reaches", item)))
        where = ["compartments", index, "hardening"]
        env = hardening.get("env")
        if env == "inherit":
            found.append((f"{name}: env inherit", _set("clean", *where, "env")))
        elif isinstance(env, dict):
            for item, variable in enumerate(env["keep"]):
                found.append((f"{name}: env.keep {variable}", _drop_kept(where, item, len(env["keep"]))))
        if hardening.get("network") == "allow":
            found.append((f"{name}: network allow", _set("none", *where, "network")))
        for key in ("read", "write"):
            for item, path in enumerate((hardening.get("filesystem") or {}).get(key, [])):
                found.append((f"{name}: filesystem.{key} {path}", _remove(*where, "filesystem", key, item)))
        seccomp = hardening.get("seccomp")
        if isinstance(seccomp, dict):
            for item, call in enumerate(seccomp.get("allow", [])):
                found.append((f"{name}: seccomp.allow {call}", _remove(*where, "seccomp", "allow", item)))
        denied = (hardening.get("audit") or {}).get("deny", [])
        for family in DENIABLE:
            if family not in denied:
                found.append((f"{name}: audit events {family}", _set({"deny": [*denied, family]}, *where, "audit")))
    return found


def without(document: dict, mutate: Mutation) -> dict:
    """``document`` with one grant taken away."""
    mutated = copy.deepcopy(document)
    mutate(mutated)
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

    for index, (what, mutate) in enumerate(grants(document)):
        mutated = tmp_path / f"mutated-{index}" / "flexos.yaml"
        mutated.parent.mkdir()
        dump(without(document, mutate), mutated)
        result = workload([workloads.FLEXOS, "run", "-c", str(mutated)], tmp_path / f"mutated-{index}")
        assert result.status != 0 or result.output != plain.output, f"{app}: without {what!r} the workload still works"


# -- every kind of grant ------------------------------------------------------------------------------
# A stand-in for a parser of untrusted input (its name is on flexos.trace.units.KNOWN_PARSERS, so the
# proposal cuts it out) that does one of everything a compartment can be granted.
PARSER = '''
"""Parses a form, the long way round: each step needs a different permission."""
import ctypes
import os
import socket
import sqlite3
import subprocess


def parse(body, port):
    fields = dict(pair.split("=") for pair in body.split("&"))
    with open("limits.cfg") as handle:  # filesystem.read
        fields["limit"] = handle.read().strip()
    with open(os.path.join("out", "last.txt"), "w") as handle:  # filesystem.write (a new file)
        handle.write(body)  # (the plain run creates it, so the traced one writes it)
    fields["token"] = os.environ.get("MULTIPART_TOKEN")  # env.keep
    with socket.create_connection(("127.0.0.1", port)) as sock:  # network, seccomp socket + connect
        fields["echo"] = sock.recv(16).decode()
    fields["spawned"] = subprocess.run(["true"]).returncode  # seccomp execve, the program's file
    fields["pid"] = ctypes.CDLL(None).getpid() == os.getpid()  # ctypes
    with sqlite3.connect(":memory:") as db:  # reaches the sqlite3 compartment
        fields["sql"] = db.execute("select 6 * 7").fetchone()[0]
    return fields
'''

FORM_APP = """
import os
import sqlite3
import sys

import multipart

db = sqlite3.connect("forms.db")
db.execute("create table if not exists forms (body text)")
db.execute("insert into forms values (?)", (sys.argv[1],))
db.commit()
print("forms", db.execute("select count(*) from forms").fetchone()[0] > 0)
print(sorted(multipart.parse(sys.argv[1], int(os.environ["APP_PORT"])).items()))
"""


def unexplained(text: str) -> list[str]:
    """The lines of a proposal that set or grant something with no comment saying why (on the line
    or just above it)."""
    lines = text.splitlines()
    # (seccomp's ``profile:`` is explained with the ``seccomp:`` it begins)
    options = ("env", "network", "reaches", "seccomp", "audit", "read", "write", "keep", "allow")
    found = []
    for index, line in enumerate(lines):
        word = line.strip().removeprefix("- ").partition(":")[0]
        granting = line.strip().startswith("- ") and not line.strip().startswith("- name:")
        if line.rstrip().endswith(":"):  # a key whose items follow, each explained
            continue
        if (granting or word in options) and "#" not in line and not lines[index - 1].strip().startswith("#"):
            found.append(line)
    return found


def test_each_kind_of_grant_is_one_the_traced_run_cannot_do_without(tmp_path):
    """Files read and written, a kept variable, the network, each system call, each audit family
    not denied and a reach: the proposal grants each, runs the app unchanged, and without any one
    of them the same run fails."""
    site = tmp_path / "site-packages" / "multipart"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(PARSER)
    project = tmp_path / "project"
    (project / "out").mkdir(parents=True)  # Landlock grants paths that exist when a compartment starts
    (project / "app.py").write_text(FORM_APP)
    (project / "limits.cfg").write_text("100\n")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(300)
    stop = threading.Event()

    def answer() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"pong")

    threading.Thread(target=answer, daemon=True).start()
    environment = dict(
        os.environ,
        PYTHONPATH=str(site.parent),
        MULTIPART_TOKEN="s3cret",
        APP_PORT=str(server.getsockname()[1]),
    )

    def run(*launcher: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*launcher, "app.py", "a=1&b=2"], cwd=project, env=environment, capture_output=True, text=True, timeout=300
        )

    try:
        plain = run(workloads.PYTHON)
        assert plain.returncode == 0, plain.stderr
        traced = run(workloads.FLEXOS, "trace", "-o", "flexos.yaml", "--")
        assert traced.returncode == 0 and traced.stdout == plain.stdout, traced.stderr
        text = (project / "flexos.yaml").read_text()
        check = subprocess.run(
            [workloads.FLEXOS, "check"], cwd=project, env=environment, capture_output=True, text=True, timeout=120
        )
        assert check.returncode == 0, check.stdout + check.stderr
        under = run(workloads.FLEXOS, "run")
        assert under.returncode == 0 and under.stdout == plain.stdout, under.stderr + text

        document = YAML(typ="rt").load(text)
        found = [what for what, _ in grants(document)]
        expected = [
            "multipart: reaches sqlite3",
            "multipart: env.keep MULTIPART_TOKEN",
            "multipart: network allow",
            "multipart: filesystem.read ./limits.cfg",
            "multipart: filesystem.read /usr/bin/true",
            "multipart: filesystem.write ./out/last.txt",  # the plain run created it
            "multipart: seccomp.allow connect",
            "multipart: seccomp.allow execve",
            "multipart: seccomp.allow socket",
            "multipart: seccomp.allow vfork",
            "multipart: audit events subprocess",
            "multipart: audit events ctypes",
            "multipart: audit events socket",
            "sqlite3: filesystem.write .",
        ]
        assert sorted(found) == sorted(expected), text
        assert unexplained(text) == [], text  # every grant says which unit, where and how often
        assert "multipart at multipart/__init__.py:19 (1x): subprocess.Popen: true" in text
        still_working = []
        for what, mutate in grants(document):
            dump(without(document, mutate), project / "flexos.yaml")
            result = run(workloads.FLEXOS, "run")
            if result.returncode == 0 and result.stdout == plain.stdout:
                still_working.append(what)
        assert still_working == [], f"granted, yet the run works without: {still_working}\n{text}"
    finally:
        stop.set()
        server.close()


NOTES_TESTS = """
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import notes


def test_a_note_is_listed_once_added(tmp_path, capsys):
    database = str(tmp_path / "notes.db")
    assert notes.main(["--db", database, "add", "buy", "milk"]) == 0
    assert notes.main(["--db", database, "list"]) == 0
    assert "buy milk" in capsys.readouterr().out


def test_a_missing_note_is_an_error(tmp_path):
    assert notes.main(["--db", str(tmp_path / "notes.db"), "delete", "7"]) == 1
"""


def test_a_run_of_the_apps_tests_merges_with_the_apps_run_into_one_proposal_both_pass_under(tmp_path):
    """``flexos trace -- notes.py ...`` then ``flexos trace -- -m pytest tests/``: one proposal
    from both runs, which checks, and under which the app and its test suite both still pass."""
    (tmp_path / "tests").mkdir()
    shutil.copy(workloads.NOTES, tmp_path / "notes.py")
    (tmp_path / "tests" / "test_notes.py").write_text(NOTES_TESTS)
    pytest_words = ["-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "tests/"]

    def run(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(words), cwd=tmp_path, capture_output=True, text=True, timeout=300)

    app = run(workloads.FLEXOS, "trace", "-o", "flexos.yaml", "--", "notes.py", "add", "call", "mom")
    assert app.returncode == 0 and app.stdout == "added note 1\n", app.stderr
    suite = run(workloads.FLEXOS, "trace", "-o", "flexos.yaml", "--write", "--", *pytest_words)
    assert suite.returncode == 0 and "2 passed" in suite.stdout, suite.stdout + suite.stderr
    text = (tmp_path / "flexos.yaml").read_text()
    assert "#   python notes.py add call mom" in text and "#   python -m pytest" in text
    assert "notes: {compartment" not in text  # the script stays the app's, though its tests import it
    document = YAML(typ="rt").load(text)
    cut = next(c for c in document["compartments"] if c["name"] == document["libraries"]["sqlite3"]["compartment"])
    # the tests' databases are in tmp_path directories, which change from run to run: the temporary
    # directory is granted, and it holds the app's database (this test's directory) too
    assert cut["hardening"]["filesystem"]["write"] == [tempfile.gettempdir()]
    check = run(workloads.FLEXOS, "check")
    assert check.returncode == 0, check.stdout + check.stderr
    listed = run(workloads.FLEXOS, "run", "notes.py", "list")
    assert listed.returncode == 0 and listed.stdout.endswith("call mom\n"), listed.stderr
    under = run(workloads.FLEXOS, "run", *pytest_words)
    assert under.returncode == 0 and "2 passed" in under.stdout, under.stdout + under.stderr
