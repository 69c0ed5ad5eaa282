"""The real load generators: redis-benchmark, wrk and iperf, run against loopback only."""

from __future__ import annotations

import csv
import re
import subprocess

HOST = "127.0.0.1"


def _run(argv: list[str], timeout: float) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def redis_benchmark(
    port: int, requests: int = 100_000, clients: int = 30, pipeline: int = 16, tests: str = "get,set"
) -> dict[str, float]:
    """Requests per second per test (``SET``, ``GET``), FlexOS's parameters by default."""
    argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-n", str(requests), "-c", str(clients)]
    argv += ["-k", "1", "-P", str(pipeline), "-t", tests, "--csv"]
    out = _run(argv, timeout=600)
    results = {row["test"]: float(row["rps"]) for row in csv.DictReader(out.splitlines()) if row.get("rps")}
    if not results:
        raise RuntimeError(f"redis-benchmark printed no results:\n{out}")
    return results


def wrk(port: int, path: str = "/", connections: int = 30, seconds: float = 10, threads: int = 2) -> dict[str, float]:
    """``{"requests": total, "rps": per second}``; raises if any response was not 2xx/3xx or failed."""
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", f"http://{HOST}:{port}{path}"]
    out = _run(argv, timeout=seconds + 60)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if bad or (errors and re.search(r"read [1-9]|write [1-9]|timeout [1-9]", errors.group(1))):
        raise RuntimeError(f"wrk saw failed requests:\n{out}")
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"wrk printed no request count or rate:\n{out}")
    return {"requests": int(total.group(1)), "rps": float(rate.group(1))}


def iperf_send(port: int, seconds: float, window: int) -> float:
    """Send a TCP stream with ``iperf -c`` for ``seconds``; return the rate iperf reports, in Gbit/s."""
    argv = ["iperf", "-c", HOST, "-p", str(port), "-t", str(seconds), "-w", str(window), "-y", "C"]
    out = _run(argv, timeout=seconds + 300).strip().splitlines()
    if not out:
        raise RuntimeError("iperf printed no report")
    return float(out[-1].split(",")[-1]) / 1e9
