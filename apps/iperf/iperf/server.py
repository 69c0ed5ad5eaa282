"""The receive loop: one connection at a time, ``recv_size`` bytes per call into the stack."""

from __future__ import annotations

import json
import time

from iperf.netstack import Listener


def receive_all(listener: Listener, recv_size: int) -> dict[str, float | int]:
    """Accept one connection and receive until the peer closes; return bytes, seconds and calls."""
    connection = listener.accept()
    total = calls = 0
    clock = time.perf_counter
    data = connection.recv(recv_size)
    started = clock()  # from the first byte, as iperf measures
    while data:
        total += len(data)
        calls += 1
        data = connection.recv(recv_size)
    elapsed = clock() - started
    connection.close()
    return {"bytes": total, "seconds": elapsed, "recv_calls": calls, "recv_size": recv_size}


def serve(host: str, port: int, recv_size: int, window: int | None, connections: int | None) -> None:
    """Report each connection's throughput as a JSON line; stop after ``connections`` (None: never)."""
    listener = Listener(host, port, window)
    print(f"iperf: listening on {listener.address[0]}:{listener.address[1]}", flush=True)
    served = 0
    try:
        while connections is None or served < connections:
            result = receive_all(listener, recv_size)
            seconds = result["seconds"] or float("nan")
            result["gbit_per_s"] = result["bytes"] * 8 / seconds / 1e9
            print(json.dumps(result), flush=True)
            served += 1
    finally:
        listener.close()
