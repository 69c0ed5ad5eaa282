"""``flexos trace``: what a learning run records, what the proposal makes of it, and the command.

A small project is traced for real: an app on the standard ``sqlite3`` and a pure-Python
third-party library (it lives in a ``site-packages`` directory) that reads a file and an
environment variable, connects to a socket, spawns a process and calls the app back. Rules that
need exact numbers (where to cut, least privilege, the cost arithmetic, the diff) are checked on
records written out by hand.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from flexos.config import parse
from flexos.trace.cost import Calibration, GateCost, predict
from flexos.trace.diff import compare
from flexos.trace.emit import _mechanism_line, proposal_yaml, scalar, space_yaml
from flexos.trace.propose import Compartment, Proposal, harden, mechanisms, place, propose, reaches
from flexos.trace.recorder import RECORD_VERSION, wire_size
from flexos.trace.runs import Run, Runs

FLEXOS = Path(sys.executable).parent / "flexos"

FAKELIB = '''
"""A third-party library that does a bit of everything a compartment may have to be allowed."""
import os
import socket
import subprocess


def echo(value):
    return value


def each(items, callback):
    return [callback(item) for item in items]


def read_config(path):
    with open(path) as handle:
        return handle.read()


def token():
    return os.environ.get("FAKELIB_TOKEN")


def ping(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return sock.recv(16)


def spawn():
    return subprocess.run(["true"]).returncode
'''

APP = """
import os
import sqlite3
import sys

import fakelib

db = sqlite3.connect("notes.db")
db.execute("create table if not exists notes (body text)")
db.execute("delete from notes")
for word in sys.argv[1:]:
    db.execute("insert into notes values (?)", (word,))
db.commit()
print("notes", db.execute("select count(*) from notes").fetchone()[0])
for _ in range(50):
    fakelib.echo(b"x" * 1000)
print("doubled", fakelib.each(range(7), lambda n: 2 * n))
print("config", fakelib.read_config("app.cfg").strip())
print("token", fakelib.token())
if os.environ.get("APP_PORT"):
    print("pong", fakelib.ping(int(os.environ["APP_PORT"])))
print("spawned", fakelib.spawn())
sys.exit(int(os.environ.get("APP_EXIT", "0")))
"""


@pytest.fixture(autouse=True)
def calibrated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A calibration cache of this machine's shape, so the command's tests do not spend a
    calibration's half minute each (the apps' tests, marked slow, calibrate for real)."""
    from flexos.trace.cost import _machine, cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    gate = {"start_s": 0.3, "call_s": 20e-6, "byte_s": 10e-9}
    cache = {
        "machine": _machine(),
        "gates": {"process": gate, "subinterp": gate, "vm": gate},
        "python_start_s": 0.02,
        "flexos_run_s": 0.3,
        "monitoring_event_s": 30e-9,
        "stretch": [1.0],
    }
    cache_file().parent.mkdir(parents=True)
    cache_file().write_text(json.dumps(cache))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages" / "fakelib"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(FAKELIB)
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.cfg").write_text("colour = blue\n")
    return tmp_path


def environment(project: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(project / "site-packages"), "FAKELIB_TOKEN": "s3cret", **extra}


@pytest.fixture
def listener():
    """A server on 127.0.0.1 that answers every connection with ``pong``."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)
    port = server.getsockname()[1]

    def serve() -> None:
        try:
            connection, _ = server.accept()
            connection.sendall(b"pong")
            connection.close()
        except OSError:
            pass

    import threading

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    server.close()


def record(project: Path, *args: str, **env: str) -> dict:
    out = project / "run.json"
    done = subprocess.run(
        [sys.executable, "-m", "flexos.trace", str(out), "app.py", *args],
        cwd=project,
        env=environment(project, **env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.fixture
def traced(project: Path, listener: int) -> dict:
    return record(project, "milk", "eggs", APP_PORT=str(listener))


def edge(data: dict, caller: str, callee: str) -> dict:
    found = [e for e in data["edges"] if e["caller"] == caller and e["callee"] == callee]
    assert found, f"no edge {caller} -> {callee} in {[(e['caller'], e['callee']) for e in data['edges']]}"
    return found[0]


def observed(data: dict, kind: str, predicate) -> list[dict]:
    return [item for item in data[kind] if predicate(item)]


# -- the recorder ------------------------------------------------------------------------------------
def test_the_run_counts_calls_across_units_with_their_bytes_and_sites(traced):
    echo = edge(traced, "__main__", "fakelib")
    assert echo["calls"] >= 50 + 1 + 1 + 1 + 1  # echo x50, each, read_config, token, ping, spawn
    assert 50 * 1005 <= echo["bytes_in"] <= 50 * 1005 + 2000  # 1000 bytes each way, and the small calls
    assert 50 * 1005 <= echo["bytes_out"]
    sites = {site["callee"]: site for site in echo["sites"]}
    assert (
        sites["echo"]["count"] == 50
        and sites["echo"]["line"] == APP.splitlines().index('    fakelib.echo(b"x" * 1000)') + 1
    )
    assert edge(traced, "fakelib", "__main__")["calls"] == 7  # the callback, called from fakelib's code
    c_calls = edge(traced, "__main__", "sqlite3")  # C functions and methods: _sqlite3 has no Python frame
    assert c_calls["calls"] >= 5 and any(site["callee"] == "connect" for site in c_calls["sites"])


def test_what_a_unit_does_is_attributed_to_it_with_the_units_below_it(traced, project):
    config = observed(traced, "files", lambda o: o["key"][1] == str(project / "app.cfg"))
    assert [o["key"][0] for o in config] == ["read"] and config[0]["chain"][:2] == ["fakelib", "__main__"]
    database = observed(traced, "files", lambda o: o["key"][0] == "database")
    assert database[0]["key"][1] == str(project / "notes.db")
    assert database[0]["chain"][0] == "sqlite3"  # the C function connect, innermost: where it would run
    token = observed(traced, "env", lambda o: o["key"] == ["FAKELIB_TOKEN", True])
    assert token and token[0]["chain"][0] == "fakelib"
    connects = observed(traced, "sockets", lambda o: o["key"][0] == "socket.connect")
    assert connects[0]["key"][1] == "AF_INET" and connects[0]["key"][2].startswith("127.0.0.1:")
    assert connects[0]["chain"][0] == "fakelib"
    spawned = observed(traced, "processes", lambda o: o["key"][0] == "subprocess.Popen")
    assert spawned[0]["key"][1] == "true" and spawned[0]["chain"][0] == "fakelib"
    events = {o["key"][0] for o in traced["events"] if o["chain"] and o["chain"][0] == "fakelib"}
    assert {"open", "socket.connect", "subprocess.Popen"} <= events


def test_the_units_name_third_party_standard_library_and_app_code_never_flexos(traced):
    units = traced["units"]
    assert units["fakelib"]["kind"] == "third-party"
    assert units["sqlite3"]["kind"] == "stdlib" and "_sqlite3" in units["sqlite3"]["extensions"]
    assert units["__main__"]["kind"] == "app"
    seen = set(units) | {
        u for kind in ("files", "env", "sockets", "processes", "events") for o in traced[kind] for u in o["chain"]
    }
    seen |= {e["caller"] for e in traced["edges"]} | {e["callee"] for e in traced["edges"]}
    assert not [u for u in seen if u.split(".")[0] in ("flexos", "msgpack")]
    assert traced["version"] == RECORD_VERSION and traced["status"] == 0 and not traced["interrupted"]
    assert 0 < traced["recorder"]["seconds"] < traced["cpu_seconds"] + 0.5 and traced["recorder"]["events"] > 100


def test_wire_size_copies_builtin_values_and_counts_other_objects_as_a_handle():
    assert wire_size(b"x" * 100) == 105 and wire_size("abc") == 8 and wire_size(7) == 9
    assert wire_size([b"ab", b"cd"]) == 5 + 7 + 7
    assert wire_size({"k": None}) == 5 + 6 + 1
    assert wire_size(object()) == 16
    big = [b"x" * 10] * 1000  # sampled: the first 64 items, scaled
    assert wire_size(big) == 5 + 15 * 1000


# -- the proposal, from the real run -----------------------------------------------------------------
def test_the_proposal_cuts_sqlite3_out_with_write_access_to_its_database_directory_only(traced, project):
    proposal = propose(Runs([Run(traced)]))
    assert [c.units for c in proposal.compartments] == [["sqlite3"]]
    sqlite = proposal.compartments[0]
    assert sqlite.entries() == ["sqlite3", "_sqlite3"]
    assert sqlite.mechanism == "process" and sqlite.usable["process"] is None
    hardening = sqlite.hardening
    assert [g.value for g in hardening.write] == ["."] and hardening.read == []
    assert "sqlite3.connect('notes.db')" in hardening.write[0].why and "app.py:8" in hardening.write[0].why
    assert (hardening.env, hardening.network, hardening.seccomp_allow) == ("clean", "none", [])
    assert hardening.audit_deny == ["subprocess", "ctypes", "socket"]
    assert proposal.compartment_of_unit("fakelib") == "app"  # pure Python, no parser: it stays


def test_the_proposal_is_a_valid_commented_flexos_yaml_that_says_where_each_grant_comes_from(traced, tmp_path):
    proposal = propose(Runs([Run(traced)]))
    text = proposal_yaml(proposal, None)
    target = tmp_path / "flexos.yaml"
    target.write_text(text)
    image, notes = parse(target)
    assert image.libraries == {"sqlite3": "sqlite3", "_sqlite3": "sqlite3"} and notes == []
    assert image.compartments["sqlite3"].hardening["filesystem"] == {"read": [], "write": ["."]}
    lines = text.splitlines()
    grant = lines.index("          - .")
    assert (
        "(1x)" in lines[grant - 1] + lines[grant - 2] and "sqlite3 at app.py:8" in lines[grant - 2] + lines[grant - 1]
    )
    assert "#   python app.py milk eggs  (exit 0" in text


def test_scalars_are_quoted_where_yaml_would_read_them_as_something_else():
    assert [scalar(s) for s in ("./data", "/etc/hosts", "yes", "a b", "on", "x:y")] == [
        "./data",
        "/etc/hosts",
        '"yes"',
        '"a b"',
        '"on"',
        '"x:y"',
    ]


# -- where to cut and least privilege, on records written by hand -------------------------------------
def run_record(edges=(), units=None, cwd="/w", **tables) -> dict:
    """A recorder's record, written by hand: edges as (caller, callee, calls, bytes)."""
    data = {
        "version": RECORD_VERSION,
        "command": ["app.py"],
        "cwd": cwd,
        "status": 0,
        "interrupted": False,
        "wall_seconds": 1.0,
        "cpu_seconds": 1.0,
        "always_readable": ["/usr/lib", "/w/code"],
        "sys_path": ["/w/code"],
        "python": "3.13",
        "recorder": {"seconds": 0.5, "events": 0, "crossings": 0},
        "imports": {},
        "units": units or {},
        "edges": [
            {
                "caller": a,
                "callee": b,
                "calls": n,
                "bytes_in": size,
                "bytes_out": 0,
                "sites": [],
                "cpu_first": 0.2,
                "cpu_last": 0.6,
            }
            for a, b, n, size in edges
        ],
    }
    for kind in ("files", "env", "sockets", "processes", "events"):
        data[kind] = [
            {"key": list(k), "chain": list(c), "count": 1, "site": "/w/code/app.py:3"} for k, c in tables.get(kind, ())
        ]
    return data


UNITS = {
    "cparser": {"kind": "third-party", "modules": ["cparser", "cparser._c"], "extensions": ["cparser._c"]},
    "app.adapter": {"kind": "app", "modules": ["app.adapter"], "extensions": []},
    "app.core": {"kind": "app", "modules": ["app.core"], "extensions": []},
    "app": {"kind": "app", "modules": ["app"], "extensions": []},
    "json": {"kind": "stdlib", "modules": ["json"], "extensions": ["_json"]},
    "__main__": {"kind": "app", "modules": ["__main__"], "extensions": []},
}


def test_an_adapter_joins_its_c_extension_and_code_needing_privilege_or_a_package_init_does_not():
    data = run_record(
        edges=[
            ("app.adapter", "cparser", 900, 0),  # the adapter around the C parser
            ("app.core", "app.adapter", 40, 0),  # ... called far less by the rest of the app
            ("app.core", "cparser", 500, 0),  # a big caller that also writes files: it must stay
            ("__main__", "app.core", 300, 0),
            ("cparser", "json", 50, 0),  # the standard library is a copy wherever it is used
            ("app", "cparser", 2000, 0),  # a package's __init__ would cover app.adapter and app.core
        ],
        units=UNITS,
        files=[(("write", "/w/out.txt", "open"), ("app.core", "__main__"))],
    )
    compartments, placement, notes = place(Runs([Run(data)]))
    assert [c.units for c in compartments] == [["cparser", "app.adapter"]]
    assert "C extension (cparser._c)" in compartments[0].why["cparser"]
    assert placement == {"cparser": "cparser", "app.adapter": "cparser"}
    assert any(note.startswith("app.core:") and "write out.txt" in note for note in notes), notes


def test_a_hardened_compartment_reaches_the_compartments_its_code_imports_from_and_no_other(tmp_path):
    data = run_record(
        edges=[("app.core", "cparser", 500, 0), ("app.core", "json", 5, 0), ("app.adapter", "json", 1, 0)],
        units=UNITS,
    )
    data["uses"] = {"cparser": {"json": "cparser"}}  # cparser's module bound json (imported it)
    data["imports"] = {"json": {"chain": ["app.adapter"], "site": "/w/code/app/adapter.py:1"}}
    proposal = propose(Runs([Run(data)]))
    reaches = {c.name: c.reaches for c in proposal.compartments}
    assert reaches == {"cparser": {"json": "cparser names json"}, "json": {}}
    text = proposal_yaml(proposal, None)
    assert "    reaches: [json]" in text and "    reaches: []" in text
    (tmp_path / "flexos.yaml").write_text(text)
    image, _ = parse(tmp_path / "flexos.yaml")
    assert image.may_reach("cparser", "json") and not image.may_reach("json", "cparser")


def test_standard_library_parsers_are_cut_only_where_the_app_itself_calls_them():
    by_library = run_record(edges=[("cparser", "json", 50, 0)], units=UNITS)
    assert place(Runs([Run(by_library)]))[0] == []
    by_app = run_record(edges=[("app.core", "json", 5, 0)], units=UNITS)
    assert [c.seed for c in place(Runs([Run(by_app)]))[0]] == ["json"]


def proposal_for(**tables) -> tuple[Proposal, list]:
    data = run_record(edges=[("__main__", "cparser", 10, 100)], units=UNITS, **tables)
    runs = Runs([Run(data)])
    compartments, placement, notes = place(runs)
    proposal = Proposal(runs, compartments, placement, notes)
    return proposal, compartments


def test_least_privilege_grants_what_the_compartment_did_on_the_narrowest_path_that_works():
    inside = ("cparser", "__main__")
    proposal, (compartment,) = proposal_for(
        files=[
            (("read", "/w/code/cparser/tables.dat", "open"), inside),  # Python's own paths: nothing to grant
            (("read", "/etc/cparser.conf", "open"), inside),
            (("create", "/w/out/result.bin", "open"), inside),  # Landlock grants creating on the directory
            (("write", "/w/out/log.txt", "open"), inside),  # beneath /w/out: covered
            (("list", "/w/in", "os.listdir"), inside),
            (("read", "/w/in/a.txt", "open"), inside),  # beneath a listed directory: covered
            (("read", "/w/secret", "open"), ("__main__",)),  # the app's own: not the compartment's
        ],
        env=[(("HOME", True), inside), (("PATH", True), inside), (("UNSET", False), inside)],
        sockets=[
            (("socket.__new__", "AF_INET", "type 1"), inside),
            (("socket.connect", "AF_INET", "10.0.0.1:80"), inside),
        ],
        processes=[(("subprocess.Popen", "/bin/true", "/bin/true"), inside)],
        events=[(("socket.connect",), inside), (("subprocess.Popen",), inside)],
    )
    hardening = harden(proposal, compartment)
    assert [g.value for g in hardening.read] == ["/bin/true", "/etc/cparser.conf", "./in"]
    assert [g.value for g in hardening.write] == ["./out"]
    assert "created out/result.bin" in hardening.write[0].why
    assert hardening.env == "keep" and hardening.env_value() == {"keep": ["HOME"]}  # not PATH, not UNSET
    assert "read $HOME" in hardening.env_keep[0].why and "app.py:3" in hardening.env_keep[0].why
    assert hardening.network == "allow" and "10.0.0.1:80" in hardening.why["network"]
    # subprocess's child starts with vfork, then executes: nothing else of a spawn is refused
    assert [g.value for g in hardening.seccomp_allow] == ["connect", "execve", "socket", "vfork"]
    assert hardening.audit_deny == ["ctypes"]  # it raised subprocess and socket events


def test_a_compartment_that_iterated_the_environment_inherits_it_and_one_that_binds_serves():
    inside = ("cparser", "__main__")
    proposal, (compartment,) = proposal_for(
        env=[(("*", True), inside), (("HOME", True), inside)],
        sockets=[
            (("socket.bind", "AF_INET", "127.0.0.1:0"), inside),
            (("socket.getaddrinfo", "name", "127.0.0.1"), inside),  # numeric: glibc reads no file for it
        ],
        processes=[(("os.fork", None, ""), inside)],  # glibc forks with clone, which compute-only allows
    )
    hardening = harden(proposal, compartment)
    assert hardening.env == "inherit" and "iterated os.environ" in hardening.why["env"]
    assert [g.value for g in hardening.seccomp_allow] == ["accept4", "bind", "listen"]
    assert hardening.read == []
    by_name, (compartment,) = proposal_for(sockets=[(("socket.getaddrinfo", "name", "db.example"), inside)])
    assert "/etc/hosts" in [g.value for g in harden(by_name, compartment).read]


def test_the_apps_script_stays_in_the_app_when_its_tests_import_it_as_a_module():
    units = {**UNITS, "notes": {"kind": "app", "modules": ["notes"], "extensions": []}}
    script = run_record(edges=[("__main__", "json", 5, 0)], units=units)
    script["command"] = ["notes.py", "list"]
    tests = run_record(edges=[("notes", "json", 50, 0), ("app.core", "notes", 2, 0)], units=units)
    tests["command"] = ["-m", "pytest", "tests/"]
    compartments, placement, _ = place(Runs([Run(script), Run(tests)]))
    assert [c.units for c in compartments] == [["json"]] and "notes" not in placement
    _, placement, _ = place(Runs([Run(tests)]))  # without the script's run, notes is a module like any other
    assert placement.get("notes") == "json"


def test_a_compartment_that_did_nothing_gets_nothing():
    proposal, (compartment,) = proposal_for(files=[(("read", "/usr/lib/x.so", "open"), ("cparser",))])
    hardening = harden(proposal, compartment)
    assert hardening.grants() == [] and hardening.audit_deny == ["subprocess", "ctypes", "socket"]
    assert (hardening.env, hardening.network) == ("clean", "none")


def test_runs_merge_into_one_proposal_granting_what_either_needed():
    first = run_record(
        edges=[("__main__", "cparser", 10, 0)], units=UNITS, files=[(("create", "/w/a/x", "open"), ("cparser",))]
    )
    second = run_record(
        edges=[("__main__", "cparser", 5, 0)], units=UNITS, files=[(("create", "/w/b/y", "open"), ("cparser",))]
    )
    proposal = propose(Runs([Run(first), Run(second)]))
    assert [g.value for g in proposal.compartments[0].hardening.write] == ["./a", "./b"]
    assert Runs([Run(first), Run(second)]).edges()[("__main__", "cparser")].calls == 15


def test_a_c_extension_that_refuses_subinterpreters_is_not_offered_subinterp():
    pytest.importorskip("hiredis", reason="scripts/setup installs hiredis (apps/kv's parser)")
    pytest.importorskip("markupsafe", reason="scripts/setup installs markupsafe (apps/http's templates)")
    refusing = Compartment("hiredis", "hiredis", ["hiredis"], {"hiredis": "C extension"})
    loading = Compartment("markupsafe", "markupsafe", ["markupsafe"], {"markupsafe": "C extension"})
    mechanisms([refusing, loading], sys.path)
    assert "does not support loading in subinterpreters" in (refusing.usable["subinterp"] or "")
    assert refusing.mechanism == "process" and refusing.usable["process"] is None
    assert loading.usable["subinterp"] is None  # multi-phase initialisation: it loads there
    assert "not subinterp: ImportError: module hiredis does not support loading in subinterpreters" in (
        _mechanism_line(refusing)
    )


# -- the cost ----------------------------------------------------------------------------------------
def test_the_prediction_prices_each_crossing_and_byte_over_the_work_between_the_first_and_last():
    data = run_record(edges=[("__main__", "cparser", 1000, 100_000), ("cparser", "cparser", 9, 9)], units=UNITS)
    proposal = propose(Runs([Run(data)]))
    (compartment,) = proposal.compartments
    compartment.mechanism, compartment.usable = "process", {"vm": "no QEMU here", "process": None, "subinterp": None}
    gates = {"process": GateCost(0.05, 10e-6, 1e-9), "subinterp": GateCost(0.01, 2e-6, 1e-9)}
    costs = Calibration(gates, python_start_s=0.02, flexos_run_s=0.3, monitoring_event_s=0.0)
    prediction = predict(proposal, costs)
    (row,) = prediction.compartments
    assert (row.crossings, row.bytes, row.starts) == (1000, 100_000, 1)
    assert row.added_s == pytest.approx(1000 * 10e-6 + 100_000 * 1e-9)
    work = 0.4 * (1 - 0.5)  # CPU between the first and last crossing, less the recorder's half
    assert prediction.work_s == pytest.approx(work)
    assert prediction.slowdown == pytest.approx((work + row.added_s) / work)
    assert row.alternatives == {"subinterp": pytest.approx((work + 1000 * 2e-6 + 100_000 * 1e-9) / work)}
    # on a machine as loaded as the calibration found it, the work takes longer by the wall clock
    # the gates' round trips are measured by, and the same crossings weigh less
    loaded = predict(proposal, Calibration(gates, 0.02, 0.3, 0.0, stretch=2.0))
    assert loaded.work_s == pytest.approx(work)
    assert loaded.slowdown == pytest.approx((2 * work + row.added_s) / (2 * work))
    base = 0.02 + 1.0 - 0.5
    assert prediction.whole_run == pytest.approx((base + row.added_s + 0.05 + 0.3) / base)


# -- the diff ----------------------------------------------------------------------------------------
OLD = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: cparser
    mechanism: {driver: process}
    hardening:
      env: clean
      network: none
      filesystem: {read: [], write: []}
      seccomp: compute-only
      limits: {memory: 512MiB}
      audit: {deny: [subprocess, ctypes, socket]}
libraries:
  cparser: {compartment: cparser}
  helper: {compartment: cparser}
"""


def test_the_diff_marks_what_widens_and_says_why(tmp_path):
    proposal, _ = proposal_for(
        files=[(("create", "/w/out/r.bin", "open"), ("cparser",))], events=[(("socket.bind",), ("cparser",))]
    )
    for compartment in proposal.compartments:
        compartment.hardening = harden(proposal, compartment)
        compartment.mechanism = "process"
    (tmp_path / "old.yaml").write_text(OLD)
    (tmp_path / "new.yaml").write_text(proposal_yaml(proposal, None))
    old, _ = parse(tmp_path / "old.yaml")
    new, _ = parse(tmp_path / "new.yaml")
    changes = {change.text: change for change in compare(old, new, proposal)}
    write = changes["compartment cparser: filesystem.write + ./out"]
    assert write.widens and "created out/r.bin" in (write.why or "")
    assert changes["compartment cparser: audit.deny - socket"].widens
    assert changes["compartment cparser: limits.memory 536870912 -> None"].widens
    assert changes["library helper: no longer placed (was in cparser): it runs in the app"].widens
    assert not compare(new, new, proposal)


KEPT = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: cparser
    mechanism: {driver: process}
    timeout: 5
    reaches: []
    hardening:
      env: {keep: [LANGUAGE]}
      network: none
      filesystem: {read: [/w/in], write: [/w/out]}
      seccomp: compute-only
libraries:
  cparser: {compartment: cparser}
  json: {compartment: cparser}
"""


def test_the_diff_compares_paths_variables_and_reaches_as_enforced(tmp_path):
    data = run_record(
        edges=[("__main__", "cparser", 10, 100), ("app.core", "json", 5, 0)],
        units=UNITS,
        files=[(("create", "/w/out/r.bin", "open"), ("cparser",)), (("list", "/w/in", "os.listdir"), ("cparser",))],
        env=[(("HOME", True), ("cparser",))],
    )
    data["uses"] = {"cparser": {"json": "cparser"}}
    runs = Runs([Run(data)])
    proposal = Proposal(runs, *place(runs))
    for compartment in proposal.compartments:
        compartment.hardening = harden(proposal, compartment)
        compartment.reaches = reaches(proposal, compartment)
        compartment.mechanism = "process"
    (tmp_path / "old.yaml").write_text(
        KEPT.replace("libraries:", "  - name: json\n    mechanism: {driver: process}\nlibraries:")
    )
    (tmp_path / "new.yaml").write_text(proposal_yaml(proposal, None))
    old, _ = parse(tmp_path / "old.yaml")
    new, _ = parse(tmp_path / "new.yaml")
    changes = {change.text: change for change in compare(old, new, proposal, "/w")}
    # ./out and ./in here are /w/out and /w/in there: the same grants, not a change
    assert not [text for text in changes if "filesystem" in text], changes
    kept = changes["compartment cparser: env.keep + HOME"]
    assert kept.widens and "read $HOME" in (kept.why or "")
    assert not changes["compartment cparser: env.keep - LANGUAGE"].widens
    reach = changes["compartment cparser: reaches + json"]
    assert reach.widens and reach.why == "cparser names json"
    assert changes["compartment cparser: timeout 5.0 -> None"].widens
    assert changes["library json: cparser -> json (with what json may do)"].widens
    elsewhere = {change.text for change in compare(old, new, proposal, "/elsewhere")}
    assert "compartment cparser: filesystem.write + ./out" in elsewhere  # /elsewhere/out is not /w/out


# -- the command -------------------------------------------------------------------------------------
def trace(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLEXOS), "trace", *args],
        cwd=project,
        env=environment(project, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_flexos_trace_writes_a_proposal_that_runs_then_only_prints_what_a_new_run_would_change(project):
    plain = subprocess.run(
        [sys.executable, "app.py", "a"], cwd=project, env=environment(project), capture_output=True, text=True
    )
    first = trace(project, "-o", "flexos.yaml", "--space", "space.yaml", "--", "app.py", "a")
    assert first.returncode == 0, first.stderr
    assert first.stdout == plain.stdout  # the app's output is the app's; the report goes to stderr
    assert "Predicted cost on this machine" in first.stderr and "wrote: flexos.yaml, space.yaml" in first.stderr
    proposal = (project / "flexos.yaml").read_text()
    check = subprocess.run([str(FLEXOS), "check"], cwd=project, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    under = subprocess.run(
        [str(FLEXOS), "run", "app.py", "b"],
        cwd=project,
        env=environment(project),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert under.returncode == 0, under.stderr
    assert under.stdout == plain.stdout

    again = trace(project, "-o", "flexos.yaml", "--", "app.py", "c")  # the same paths: nothing changes
    assert again.returncode == 0, again.stderr
    assert "flexos.yaml already is the proposal: nothing to change" in again.stderr, again.stderr
    assert "WIDENS" not in again.stderr and (project / "flexos.yaml").read_text() == proposal

    elsewhere = project.parent / f"{project.name}-elsewhere"  # in the temporary directory, not the app's
    elsewhere.mkdir()
    (project / "app2.py").write_text(
        APP.replace('sqlite3.connect("notes.db")', f'sqlite3.connect("{elsewhere}/notes.db")')
    )
    second = trace(project, "-o", "flexos.yaml", "--", "app2.py")
    assert second.returncode == 0, second.stderr
    temporary = tempfile.gettempdir()  # a temporary path changes from run to run: its directory is granted
    assert f"WIDENS compartment sqlite3: filesystem.write + {temporary}" in second.stderr
    assert f"because: sqlite3 at app2.py:8 (1x): sqlite3.connect('{elsewhere}/notes.db')" in second.stderr
    assert "a temporary path (it changes from run to run)" in second.stderr
    assert "nothing written" in second.stderr and (project / "flexos.yaml").read_text() == proposal
    taken = trace(project, "-o", "flexos.yaml", "--write")  # no command: from the two recorded runs
    assert taken.returncode == 0, taken.stderr
    image, _ = parse(project / "flexos.yaml")
    assert image.compartments["sqlite3"].hardening["filesystem"]["write"] == [temporary]  # it holds the app too
    assert "#   python app2.py" in (project / "flexos.yaml").read_text()
    assert len(json.loads((project / "flexos.trace.json").read_text())["runs"]) == 3


def test_flexos_trace_passes_the_apps_exit_status_on_and_keeps_its_run(project):
    done = trace(project, "-o", "flexos.yaml", "--", "app.py", APP_EXIT="3")
    assert done.returncode == 3 and "the traced app exited with status 3; its run is recorded" in done.stderr
    assert (project / "flexos.yaml").exists()
    assert json.loads((project / "flexos.trace.json").read_text())["runs"][0]["status"] == 3


def test_flexos_trace_without_a_command_or_runs_says_what_to_do(tmp_path):
    done = subprocess.run(
        [str(FLEXOS), "trace", "-o", str(tmp_path / "f.yaml")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1 and "no run recorded" in done.stderr and "flexos trace -- app.py" in done.stderr


SERVER = """
import socket
server = socket.create_server(("127.0.0.1", 0))
print("listening on", server.getsockname()[1], flush=True)
try:
    server.accept()
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


def test_a_server_ended_by_sigterm_is_recorded_and_proposed(tmp_path):
    (tmp_path / "server.py").write_text(SERVER)
    process = subprocess.Popen(
        [str(FLEXOS), "trace", "-o", "flexos.yaml", "--", "server.py"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stdout.readline().startswith("listening on")
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGTERM)  # the whole group, as a terminal or an init system would
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert out == "stopped\n" and (tmp_path / "flexos.yaml").exists()
    (run,) = json.loads((tmp_path / "flexos.trace.json").read_text())["runs"]
    assert run["interrupted"] and any(o["key"][0] == "socket.bind" for o in run["sockets"])


def test_the_space_lists_the_proposed_cuts_for_explore(traced, tmp_path):
    pytest.importorskip("networkx", reason="flexos explore needs the explore extra")
    proposal = propose(Runs([Run(traced)]))
    (tmp_path / "space.yaml").write_text(space_yaml(proposal))
    listed = subprocess.run(
        [str(FLEXOS), "explore", "--list", str(tmp_path / "space.yaml")], capture_output=True, text=True, timeout=120
    )
    assert listed.returncode == 0, listed.stderr
    assert "S1_f" in listed.stdout and "S1_pEnvNetSeccompFs" in listed.stdout
    assert "modules: [sqlite3, _sqlite3]" in (tmp_path / "space.yaml").read_text()


def test_trace_loads_nothing_of_the_explore_extra():
    imports = subprocess.run(
        [sys.executable, "-c", "import flexos.trace.session, sys; print(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    loaded = imports.stdout.split()
    assert "flexos.trace.session" in loaded and not {"numpy", "networkx", "matplotlib"} & set(loaded)
