"""The example apps run unmodified under flexos, through the real ``flexos`` command."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "examples" / "sqlite_notes"
FLEXOS = Path(sys.executable).parent / "flexos"
CONFIGS = ["flexos.yaml", "flexos-strict.yaml"]
ROW = re.compile(r"^\s*(\d+)  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d  (.*)$")


def run_notes(config: str | None, *args: str, db: Path, via_env: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOTES_DB": str(db)} if via_env else {k: v for k, v in os.environ.items() if k != "NOTES_DB"}
    argv = [*args] if via_env else ["--db", str(db), *args]
    if config is None:
        command = [sys.executable, str(NOTES / "notes.py"), *argv]
    else:
        command = [str(FLEXOS), "run", "-c", str(NOTES / config), str(NOTES / "notes.py"), *argv]
    cwd = db.parent if db.parent.is_dir() else None
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def rows(stdout: str) -> list[tuple[int, str]]:
    found = []
    for line in stdout.splitlines():
        match = ROW.match(line)
        assert match, f"not a note line: {line!r}"
        found.append((int(match.group(1)), match.group(2)))
    return found


@pytest.mark.parametrize("config", CONFIGS)
def test_sqlite_notes_config_checks(config: str) -> None:
    result = subprocess.run(
        [str(FLEXOS), "check", "-c", str(NOTES / config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.search(r"^\s+sqlite3\s+-> db$", result.stdout, re.MULTILINE)


@pytest.mark.parametrize("config", CONFIGS)
def test_sqlite_notes_add_list_search(tmp_path: Path, config: str) -> None:
    db = tmp_path / "notes.db"

    result = run_notes(config, "add", "buy", "milk", db=db)
    assert (result.returncode, result.stdout, result.stderr) == (0, "added note 1\n", "")
    result = run_notes(config, "add", "call 100% of the team", db=db, via_env=True)  # DB path from $NOTES_DB
    assert (result.returncode, result.stdout, result.stderr) == (0, "added note 2\n", "")
    result = run_notes(config, "add", "milk the cows", db=db)
    assert result.returncode == 0, result.stderr

    result = run_notes(config, "list", db=db)
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout) == [(1, "buy milk"), (2, "call 100% of the team"), (3, "milk the cows")]

    result = run_notes(config, "search", "milk", db=db)
    assert result.returncode == 0, result.stderr
    assert rows(result.stdout) == [(1, "buy milk"), (3, "milk the cows")]

    result = run_notes(config, "search", "100%", db=db, via_env=True)  # LIKE wildcards are escaped
    assert rows(result.stdout) == [(2, "call 100% of the team")]

    result = run_notes(config, "search", "bread", db=db)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "no notes contain 'bread'\n"

    result = run_notes(config, "delete", "1", db=db)
    assert (result.returncode, result.stdout) == (0, "deleted note 1\n")
    assert [i for i, _ in rows(run_notes(config, "list", db=db).stdout)] == [2, 3]


@pytest.mark.parametrize("config", CONFIGS)
def test_sqlite_notes_error_crosses_the_gate(tmp_path: Path, config: str) -> None:
    """sqlite3.OperationalError raised in the db compartment is caught by the app's ``except sqlite3.Error``."""
    missing = tmp_path / "no" / "such" / "dir" / "notes.db"
    result = run_notes(config, "list", db=missing)
    assert result.returncode == 1
    assert result.stderr == f"notes: {missing}: unable to open database file\n"


@pytest.mark.parametrize("config", CONFIGS)
def test_sqlite_notes_same_output_as_without_flexos(tmp_path: Path, config: str) -> None:
    plain, gated = tmp_path / "plain.db", tmp_path / "gated.db"
    for text in ["one", "two words", "three_under"]:
        assert run_notes(None, "add", text, db=plain).returncode == 0
        assert run_notes(config, "add", text, db=gated).returncode == 0
    for args in [("list",), ("search", "_"), ("search", "o")]:
        expected, actual = run_notes(None, *args, db=plain), run_notes(config, *args, db=gated)
        assert [body for _, body in rows(actual.stdout)] == [body for _, body in rows(expected.stdout)]
        assert actual.returncode == expected.returncode


@pytest.mark.parametrize("config", CONFIGS)
def test_sqlite3_is_behind_a_gate(tmp_path: Path, config: str) -> None:
    """The example configs really move sqlite3 out of the app's compartment."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sqlite3\n"
        "print(type(sqlite3).__name__, sqlite3.__name__)\n"
        "print(type(sqlite3.connect(':memory:')).__module__)\n"
    )
    result = subprocess.run(
        [str(FLEXOS), "run", "-c", str(NOTES / config), str(probe)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ModuleProxy sqlite3", "sqlite3"]
