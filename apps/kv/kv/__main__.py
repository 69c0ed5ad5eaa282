"""``python -m kv``: start the key-value server (loopback only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kv.net import serve
from kv.persist import AppendOnlyFile, SqliteLog
from kv.store import Store


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kv", description="A Redis-protocol key-value server.")
    parser.add_argument("--port", type=int, default=6399, help="TCP port on 127.0.0.1 (0: any free port; 6399)")
    parser.add_argument(
        "--persistence", choices=["aof", "sqlite", "none"], default="aof", help="how writes are kept (aof)"
    )
    parser.add_argument("--dir", type=Path, default=Path("data"), help="where the AOF or database lives (./data)")
    args = parser.parse_args(argv)
    log = None
    if args.persistence == "aof":
        log = AppendOnlyFile(str(args.dir / "appendonly.aof"))
    elif args.persistence == "sqlite":
        log = SqliteLog(str(args.dir / "kv.sqlite3"))
    try:
        serve("127.0.0.1", args.port, Store(log))
    except KeyboardInterrupt:
        pass
    finally:
        if log is not None:
            log.close()


if __name__ == "__main__":
    main()
