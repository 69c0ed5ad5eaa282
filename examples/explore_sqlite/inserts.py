"""Insert rows into a new SQLite database, one transaction each, and print the rate.

An ordinary program that knows nothing about flexos: ``flexos explore space.yaml`` runs it under
each generated flexos.yaml, with sqlite3 in the app's own process or in a (hardened) compartment
process. The last line of its output is the rate in rows per second (FlexOS's figure 10 workload).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="how many INSERTs (default 2000)")
    parser.add_argument(
        "--dir",
        default="/dev/shm" if os.path.isdir("/dev/shm") else None,
        help="where the database file is created (default: /dev/shm, a tmpfs)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="explore-sqlite-") as directory:
        connection = sqlite3.connect(os.path.join(directory, "inserts.db"), isolation_level=None)
        connection.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, value REAL)")
        started = time.perf_counter()
        for i in range(args.rows):
            connection.execute("INSERT INTO items (id, name, value) VALUES (?, ?, ?)", (i, f"item {i}", i * 0.5))
        elapsed = time.perf_counter() - started
        count = connection.execute("SELECT count(*) FROM items").fetchone()[0]
        connection.close()
    if count != args.rows:
        raise SystemExit(f"expected {args.rows} rows, found {count}")
    print(f"{args.rows} rows in {elapsed:.3f} s")
    print(f"{args.rows / elapsed:.1f}")


if __name__ == "__main__":
    main()
