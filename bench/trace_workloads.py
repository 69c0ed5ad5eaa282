"""The workloads ``flexos trace`` is judged on: apps/kv, apps/http and examples/sqlite_notes, each
run the same way plainly, under ``flexos trace`` and under a proposal.

A workload is started with a *launcher*, the words before the app's own command: ``[python]``,
``[flexos, "trace", "-o", FILE, "--"]`` or ``[flexos, "run", "-c", FILE]``. It returns what the app
and its clients printed (the output that must be identical under a proposal) and how long the
measured part took. Used by bench/trace_predict.py and tests/test_trace_apps.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FLEXOS = str(Path(sys.executable).with_name("flexos"))
NOTES = REPO / "examples" / "sqlite_notes" / "notes.py"
_LISTENING = re.compile(r"listening on [0-9.]+:(\d+)")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@dataclass(frozen=True)
class Result:
    status: int  # 0 when the app and every client step worked
    output: list[str]  # what must be the same under a proposal
    seconds: float  # the measured part: the client's time, or the commands' wall time
    stderr: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def exchange(port: int, payload: bytes, quiet: float | None = None) -> bytes:
    """Send ``payload`` on a new connection; what comes back until the server closes it (or, with
    ``quiet``, until it has said nothing for that many seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if quiet is not None:
                    sock.settimeout(quiet)
        except TimeoutError:
            if quiet is None or not chunks:
                raise
    return b"".join(chunks)


def _resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Server:
    """A server app in a session of its own, stopped with SIGTERM to its group (as an init system does)."""

    def __init__(self, command: list[str], cwd: Path, pythonpath: Path) -> None:
        env = dict(
            os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))
        )
        self.proc = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr or []), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or []:
            self.lines.append(line.rstrip("\n"))
            if _LISTENING.search(line):
                self._ready.set()
        self._ready.set()

    def wait_listening(self, timeout: float = 60) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"{self.proc.args} did not start listening:\n{''.join(self.errors)[-3000:]}")

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM the group; wait (a trace writes its proposal then); SIGKILL what is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            status = -9
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.2)  # let the readers drain
        return status


def _serve(
    app: str,
    module: str,
    launcher: list[str],
    workdir: Path,
    drive: Callable[[int], tuple[list[str], float]],
    options: tuple[str, ...] = (),
) -> Result:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)  # Landlock allows paths that exist when a compartment starts
    port = free_port()
    server = Server([*launcher, "-m", module, "--port", str(port), *options], workdir, REPO / "apps" / app)
    try:
        server.wait_listening()
        output, seconds = drive(port)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        server.stop()
        return Result(1, [f"failed: {exc}"], 0.0, "".join(server.errors))
    status = server.stop()
    ended = status in (0, 130, -signal.SIGTERM, 128 + signal.SIGTERM)  # a server ends by the signal
    printed = [_LISTENING.sub("listening on <port>", line) for line in server.lines]
    return Result(0 if ended else status, [*printed, *output], seconds, "".join(server.errors))


def _redis_benchmark(port: int, requests: int) -> float:
    started = time.perf_counter()
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", "30", "-k", "1"]
    subprocess.run([*argv, "-P", "16", "-t", "get,set", "-q"], check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def kv(launcher: list[str], workdir: Path, size: int = 2000, persistence: str = "aof") -> Result:
    """apps/kv: redis-benchmark (``size`` GETs and SETs, 30 clients, pipelines of 16), then the
    commands of tests/test_apps.py, replies and all."""

    def drive(port: int) -> tuple[list[str], float]:
        seconds = _redis_benchmark(port, size)
        commands = _resp(b"SET", b"k", b"v") + _resp(b"GET", b"k") + _resp(b"INCR", b"n") + _resp(b"GETX")
        replies = [
            exchange(port, commands, quiet=0.3),
            exchange(port, _resp(b"DEL", b"k", b"missing") + _resp(b"GET", b"k"), quiet=0.3),
            exchange(port, b"!not resp\r\n"),
        ]
        return [repr(reply) for reply in replies], seconds

    return _serve("kv", "kv", launcher, workdir, drive, ("--persistence", persistence))


def kv_sqlite(launcher: list[str], workdir: Path, size: int = 2000) -> Result:
    """apps/kv keeping its dataset in sqlite3 (``--persistence sqlite``): the same workload."""
    return kv(launcher, workdir, size, persistence="sqlite")


_HTTP_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: <tester>\r\nConnection: close\r\n\r\n",
    b"GET /item/3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /static/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"HEAD /static/index.html HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /static/../web/net.py HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
]


def http(launcher: list[str], workdir: Path, size: int = 1) -> Result:
    """apps/http: wrk on ``/`` for ``size`` seconds (the time per request is measured), then the
    requests of tests/test_apps.py, answers and all."""

    def drive(port: int) -> tuple[list[str], float]:
        argv = ["wrk", "-t", "1", "-c", "10", "-d", f"{size}s", f"http://127.0.0.1:{port}/"]
        done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=size + 120)
        total = re.search(r"(\d+) requests in", done.stdout)
        if total is None or int(total.group(1)) == 0:
            raise RuntimeError(f"wrk: no requests answered:\n{done.stdout}")
        answers = [exchange(port, request) for request in _HTTP_REQUESTS]
        return [repr(answer) for answer in answers], size / int(total.group(1))

    return _serve("http", "web", launcher, workdir, drive)


NOTES_COMMANDS = [
    ["add", "buy", "milk"],
    ["add", "call", "mom"],
    ["search", "milk"],
    ["delete", "1"],
    ["list"],
]


def sqlite_notes(launcher: list[str], workdir: Path, size: int = 1) -> Result:
    """examples/sqlite_notes: add, search, delete and list notes (``size`` times over), each command
    its own process; the creation times it prints are masked."""
    workdir.mkdir(parents=True, exist_ok=True)
    output, errors, seconds = [], [], 0.0
    for _ in range(size):
        for words in NOTES_COMMANDS:
            started = time.perf_counter()
            done = subprocess.run(
                [*launcher, str(NOTES), "--db", "notes.db", *words],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=300,
            )
            seconds += time.perf_counter() - started
            output += [_TIMESTAMP.sub("<time>", line) for line in done.stdout.splitlines()]
            errors.append(done.stderr)
            if done.returncode != 0:
                return Result(done.returncode, output, seconds, "".join(errors))
    return Result(0, output, seconds, "".join(errors))


WORKLOADS: dict[str, Callable[..., Result]] = {
    "kv": kv,
    "kv_sqlite": kv_sqlite,
    "http": http,
    "sqlite_notes": sqlite_notes,
}
