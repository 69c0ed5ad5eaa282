"""``python -m iperf``: receive TCP streams on loopback and report their throughput."""

from __future__ import annotations

import argparse

from iperf.server import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m iperf", description="The receiving end of iperf -c.")
    parser.add_argument("--port", type=int, default=5099, help="TCP port on 127.0.0.1 (0: any free port; 5099)")
    parser.add_argument("--recv-size", type=int, default=16384, help="bytes asked for per receive call (16384)")
    parser.add_argument("--window", type=int, help="receive socket buffer in bytes (default: the kernel's)")
    parser.add_argument("--connections", type=int, help="exit after this many connections (default: never)")
    args = parser.parse_args(argv)
    if args.recv_size < 1:
        parser.error(f"--recv-size must be at least 1, not {args.recv_size}")
    try:
        serve("127.0.0.1", args.port, args.recv_size, args.window, args.connections)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
