"""``python -m sqlbench``: time N INSERTs into a new database, one transaction per INSERT."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

INSERT = "INSERT INTO items (id, name, value) VALUES (?, ?, ?)"


def insert_rows(path: str, rows: int) -> dict[str, float | int | str]:
    """Create ``path`` afresh and INSERT ``rows`` rows in autocommit mode; return the timings."""
    for suffix in ("", "-journal", "-wal"):
        Path(path + suffix).unlink(missing_ok=True)
    started = time.perf_counter()
    connection = sqlite3.connect(path, isolation_level=None)  # autocommit: each INSERT is a transaction
    connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value REAL)")
    setup = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(rows):
        connection.execute(INSERT, (i, f"item {i}", i * 0.5))
    elapsed = time.perf_counter() - started
    count = connection.execute("SELECT count(*) FROM items").fetchone()[0]
    journal = connection.execute("PRAGMA journal_mode").fetchone()[0]
    connection.close()
    if count != rows:
        raise SystemExit(f"sqlbench: expected {rows} rows in {path}, found {count}")
    return {"inserts": rows, "seconds": elapsed, "setup_seconds": setup, "journal_mode": journal, "db": path}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sqlbench", description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="data/bench.sqlite3", help="database file, recreated (data/bench.sqlite3)")
    parser.add_argument("--inserts", type=int, default=5000, help="how many INSERTs (5000)")
    args = parser.parse_args(argv)
    Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    result = insert_rows(args.db, args.inserts)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
