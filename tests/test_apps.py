"""The reference apps (apps/) work, plainly and under each of their flexos configurations.

Real servers in their own process groups, driven by real clients (redis-benchmark, wrk, iperf -c,
and plain sockets for the edge cases); isolation is checked in /proc: under a process
configuration the isolated C extension is loaded by a compartment process, not by the app.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.common.apps import AppProcess, Variant, refusal, run_to_end
from experiments.common.clients import iperf_send, redis_benchmark, wrk
from experiments.common.paths import APPS
from flexos.drivers import unavailable

PLAIN = Variant("none", "no flexos", None, "none")
SUBINTERP_REFUSED = unavailable("subinterp")


def configs(app: str) -> list[str]:
    return sorted(path.name for path in (APPS / app / "configs").glob("*.yaml"))


def variant(config: str | None) -> Variant:
    return PLAIN if config is None else Variant(config, config, config, "")


def needs(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (scripts/setup installs it)")


def runnable(app: str, config: str | None) -> Variant:
    """The variant, or a skip saying why this machine cannot run it."""
    chosen = variant(config)
    reason = refusal(app, chosen)
    if reason is not None:
        pytest.skip(f"{app} {config}: {reason}")
    return chosen


def exchange(port: int, payload: bytes, size: int | None = None) -> bytes:
    """Send ``payload`` on a new connection; return ``size`` bytes of answer, or all of it until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks, received = [], 0
        while size is None or received < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            received += len(chunk)
    return b"".join(chunks)


def ask(port: int, payload: bytes, expected: bytes) -> None:
    """Send RESP commands; the replies must be exactly ``expected``."""
    assert exchange(port, payload, len(expected)) == expected


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def loaded_by(pid: int, fragment: str) -> bool:
    """Whether process ``pid`` has a file whose path contains ``fragment`` mapped."""
    return fragment in Path(f"/proc/{pid}/maps").read_text()


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid`` (zombies, already dead, are left out): an app's compartments,
    each in a session of its own."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running (not gone, not a zombie)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def assert_isolated(server: AppProcess, extension: str) -> None:
    """``extension`` (a C extension's file name) is loaded by a compartment process, not by the app."""
    app_pid = server.proc.pid
    children = children_of(app_pid)
    assert not loaded_by(app_pid, extension), f"{extension} is loaded by the app itself"
    assert any(loaded_by(pid, extension) for pid in children), f"no compartment process loaded {extension}"


# -- kv ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, *configs("kv")])
def test_kv_serves_redis_benchmark_and_commands(config, tmp_path):
    needs("redis-benchmark")
    chosen = runnable("kv", config)
    expect_import_failure = config is not None and "subinterp" in config and "parser" in config
    with AppProcess("kv", chosen, ["--port", "0"], tmp_path) as server:
        if expect_import_failure:  # hiredis is single-phase init: it refuses subinterpreters, and says so
            with pytest.raises(RuntimeError, match="hiredis does not support loading in subinterpreters"):
                server.wait_listening()
            return
        port = server.wait_listening()
        rates = redis_benchmark(port, requests=2000)
        assert set(rates) == {"SET", "GET"} and all(rate > 0 for rate in rates.values())
        ask(
            port,
            resp(b"SET", b"k", b"v") + resp(b"GET", b"k") + resp(b"INCR", b"n") + resp(b"GETX"),
            b"+OK\r\n$1\r\nv\r\n:1\r\n-ERR unknown command 'GETX'\r\n",
        )
        ask(port, resp(b"DEL", b"k", b"missing") + resp(b"GET", b"k"), b":1\r\n$-1\r\n")
        assert exchange(port, b"!not resp\r\n").startswith(b"-ERR Protocol error")  # and the server closes
        if config in ("parser-process.yaml", "parser-process-hardened.yaml", "all-process.yaml"):
            assert_isolated(server, "hiredis.cpython")
    aof = (tmp_path / "data" / "appendonly.aof").read_bytes()
    assert resp(b"SET", b"k", b"v") in aof and resp(b"DEL", b"k") in aof


@pytest.mark.parametrize("persistence", ["aof", "sqlite"])
def test_kv_replays_its_persistence_after_a_restart(persistence, tmp_path):
    args = ["--port", "0", "--persistence", persistence]
    with AppProcess("kv", PLAIN, args, tmp_path) as server:
        port = server.wait_listening()
        ask(port, resp(b"SET", b"a", b"1") + resp(b"INCR", b"a") + resp(b"SET", b"b", b"x"), b"+OK\r\n:2\r\n+OK\r\n")
        ask(port, resp(b"DEL", b"b"), b":1\r\n")
    with AppProcess("kv", PLAIN, args, tmp_path) as server:
        port = server.wait_listening()
        ask(port, resp(b"GET", b"a") + resp(b"GET", b"b") + resp(b"DBSIZE"), b"$1\r\n2\r\n$-1\r\n:1\r\n")


def test_kv_refuses_a_corrupt_append_only_file_saying_what_to_do(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "appendonly.aof").write_bytes(b"this is not RESP\r\n")
    with AppProcess("kv", PLAIN, ["--port", "0"], tmp_path) as server:
        with pytest.raises(RuntimeError, match=r"not an append-only file .*; move it away to start empty"):
            server.wait_listening()


# -- http -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, *configs("http")])
def test_http_serves_pages_files_and_errors(config, tmp_path):
    needs("wrk")
    chosen = runnable("http", config)
    with AppProcess("http", chosen, ["--port", "0"], tmp_path) as server:
        if config is not None and "parser-subinterp" in config:  # httptools is single-phase init
            with pytest.raises(RuntimeError, match="does not support loading in subinterpreters"):
                server.wait_listening()
            return
        port = server.wait_listening()
        assert wrk(port, "/", seconds=1)["requests"] > 0
        page = exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: <tester>\r\nConnection: close\r\n\r\n")
        assert page.startswith(b"HTTP/1.1 200 OK\r\n") and b"25 items, served to &lt;tester&gt;" in page
        assert b"item &lt;3&gt;" in page  # autoescaped
        item = exchange(port, b"GET /item/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"<h1>item &lt;3&gt;</h1>" in item
        css = exchange(port, b"GET /static/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"Content-Type: text/css" in css and b"border-collapse" in css
        two = exchange(
            port,
            b"HEAD /static/index.html HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert two.startswith(b"HTTP/1.1 200 OK\r\n") and b"Welcome" not in two and b"404 Not Found" in two
        escape = exchange(port, b"GET /static/../web/net.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert escape.startswith(b"HTTP/1.1 404") and b"asyncio" not in escape
        assert exchange(
            port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ).startswith(b"HTTP/1.1 405")
        bad = exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        assert bad.startswith(b"HTTP/1.1 400 Bad Request")
        if config in ("parser-process.yaml", "parser-process-hardened.yaml", "all-process.yaml"):
            assert_isolated(server, "httptools/parser/parser.cpython")


# -- sqlite -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, *configs("sqlite")])
def test_sqlite_inserts_each_row_in_its_own_transaction(config, tmp_path):
    chosen = runnable("sqlite", config)
    lines = run_to_end("sqlite", chosen, ["--inserts", "300"], tmp_path, timeout=300)
    result = json.loads(lines[-1])
    assert result["inserts"] == 300 and result["seconds"] > 0
    assert (tmp_path / "data" / "bench.sqlite3").exists()
    rows = subprocess.run(
        ["sqlite3", str(tmp_path / "data" / "bench.sqlite3"), "SELECT count(*), max(id) FROM items"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert rows.stdout.strip() == "300|299"


# -- iperf ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [None, *configs("iperf")])
def test_iperf_receives_a_real_iperf_stream(config, tmp_path):
    needs("iperf")
    chosen = runnable("iperf", config)
    with AppProcess("iperf", chosen, ["--port", "0", "--recv-size", "512", "--connections", "1"], tmp_path) as server:
        port = server.wait_listening()
        sent = iperf_send(port, 0.3, 128 * 1024)
        server.proc.wait(120)
    report = json.loads(server.lines[-1])
    assert sent > 0 and report["bytes"] > 0 and report["recv_size"] == 512
    assert report["recv_calls"] >= report["bytes"] / 512  # never more than asked for per receive


def test_stopping_an_app_ends_every_compartment_process(tmp_path):
    chosen = runnable("kv", "all-process.yaml")
    with AppProcess("kv", chosen, ["--port", "0"], tmp_path) as server:
        ask(server.wait_listening(), resp(b"SET", b"k", b"v"), b"+OK\r\n")  # every compartment has started
        compartments = children_of(server.proc.pid)
        assert len(compartments) == 4, f"expected 4 compartment processes, found {compartments}"
    deadline = time.monotonic() + 10  # each ends when it sees the app gone
    while alive(compartments) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(compartments) == []


def test_iperf_rejects_a_bad_receive_size_saying_which_option(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "iperf", "--recv-size", "0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(APPS / "iperf")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--recv-size must be at least 1, not 0" in proc.stderr


def test_apps_know_nothing_of_flexos():
    for app in ("kv", "http", "sqlite", "iperf"):
        for path in (APPS / app).rglob("*.py"):
            assert "flexos" not in path.read_text().lower(), f"{path} mentions flexos"
