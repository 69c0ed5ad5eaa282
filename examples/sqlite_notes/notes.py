"""A tiny note-taker on sqlite3. Plain Python: it knows nothing about flexos.

    python notes.py [--db PATH] add TEXT...
    python notes.py [--db PATH] list
    python notes.py [--db PATH] search WORD
    python notes.py [--db PATH] delete ID

The database is --db PATH, else $NOTES_DB, else ./notes.db.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from contextlib import closing

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT    NOT NULL DEFAULT (datetime('now')),
    body    TEXT    NOT NULL
)
"""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    db.execute(SCHEMA)
    return db


def add(db: sqlite3.Connection, text: str) -> int:
    with db:  # one transaction: committed on success, rolled back on error
        cursor = db.execute("INSERT INTO notes (body) VALUES (?)", (text,))
    return cursor.lastrowid


def notes(db: sqlite3.Connection, word: str | None = None) -> list[sqlite3.Row]:
    if word is None:
        return db.execute("SELECT id, created, body FROM notes ORDER BY id").fetchall()
    pattern = "%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    query = "SELECT id, created, body FROM notes WHERE body LIKE ? ESCAPE '\\' ORDER BY id"
    return list(db.execute(query, (pattern,)))


def delete(db: sqlite3.Connection, note_id: int) -> bool:
    with db:
        return db.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount > 0


def show(rows: list[sqlite3.Row]) -> None:
    for row in rows:
        print(f"{row['id']:>4}  {row['created']}  {row['body']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notes", description="Keep notes in a sqlite database.")
    parser.add_argument("--db", default=os.environ.get("NOTES_DB", "notes.db"), help="database file")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("add", help="add a note").add_argument("text", nargs="+")
    commands.add_parser("list", help="list all notes")
    commands.add_parser("search", help="notes containing WORD").add_argument("word")
    commands.add_parser("delete", help="delete a note").add_argument("id", type=int)
    args = parser.parse_args(argv)

    try:
        with closing(connect(args.db)) as db:
            if args.command == "add":
                print(f"added note {add(db, ' '.join(args.text))}")
            elif args.command == "list":
                show(notes(db))
            elif args.command == "search":
                found = notes(db, args.word)
                show(found)
                if not found:
                    print(f"no notes contain {args.word!r}", file=sys.stderr)
                    return 1
            elif args.command == "delete":
                if not delete(db, args.id):
                    print(f"no note {args.id}", file=sys.stderr)
                    return 1
                print(f"deleted note {args.id}")
    except sqlite3.Error as exc:
        print(f"notes: {args.db}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
