"""Persistence of write commands: Redis's append-only file, or a sqlite3 table.

Both take a batch of write commands at a time (one call per client read), so a pipelined batch
costs one write (AOF) or one transaction (sqlite3).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kv import replies
from kv.resp import Parsers


class AppendOnlyFile:
    """Write commands appended in RESP, as Redis's ``appendonly yes`` does; replayed on start."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # open for the life of the server

    def replay(self) -> list[list[bytes]]:
        """Every command logged so far, oldest first."""
        commands, errors = Parsers().feed({0: self.path.read_bytes()})
        if errors:
            raise ValueError(f"{self.path}: not an append-only file ({errors[0]}); move it away to start empty")
        return commands.get(0, [])  # an incomplete last command (a torn write) is dropped

    def append(self, commands: list[list[bytes]]) -> None:
        self._file.write(b"".join(replies.array(command) for command in commands))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class SqliteLog:
    """The dataset kept in a sqlite3 table: SET upserts, DEL deletes; one transaction per batch."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL)")

    def replay(self) -> list[list[bytes]]:
        return [[b"SET", key, value] for key, value in self._db.execute("SELECT key, value FROM kv")]

    def append(self, commands: list[list[bytes]]) -> None:
        db = self._db
        db.execute("BEGIN")
        for command in commands:
            name = command[0].upper()
            if name == b"SET":
                db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (command[1], command[2]))
            elif name == b"DEL":
                db.executemany("DELETE FROM kv WHERE key = ?", [(key,) for key in command[1:]])
            elif name == b"FLUSHALL":
                db.execute("DELETE FROM kv")
        db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()
