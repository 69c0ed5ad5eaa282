"""``flexos run``: an unmodified app under an image, behaving as ``python app.py`` would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FLEXOS = Path(sys.executable).parent / "flexos"

IMAGE_YAML = """\
compartments:
  - name: app
    mechanism:
      driver: fcalls
    default: true
  - name: {name}
    mechanism:
      driver: process
libraries:
  sqlite3:
    compartment: {name}
"""

APP = """\
import os
import sys

import sqlite3

connection = sqlite3.connect(":memory:")
answer = connection.execute("select 6 * 7").fetchone()[0]
print("answer", answer)
print("gate", sqlite3)
print("argv", sys.argv[1:])
code = int(os.environ.get("APP_EXIT", "0"))
if os.environ.get("APP_RAISE"):
    raise RuntimeError("boom from the app")
sys.exit(code)
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with flexos.yaml (sqlite3 in process compartment ``db``) and app.py."""
    (tmp_path / "flexos.yaml").write_text(IMAGE_YAML.format(name="db"))
    (tmp_path / "app.py").write_text(APP)
    return tmp_path


def flexos_run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [str(FLEXOS), "run", *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=environment
    )


def test_console_script_exists():
    assert FLEXOS.exists(), f"{FLEXOS} missing: is flexos installed in this venv?"


def test_stdout_is_the_apps(project):
    done = flexos_run(project, "app.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "answer 42",
        "gate <module 'sqlite3' in compartment 'db'>",
        "argv []",
    ]


def test_argv_passes_through(project):
    done = flexos_run(project, "app.py", "--flag", "value with spaces", "-c", "-m")
    assert done.returncode == 0, done.stderr
    assert "argv ['--flag', 'value with spaces', '-c', '-m']" in done.stdout.splitlines()


def test_exit_code_is_the_apps(project):
    done = flexos_run(project, "app.py", env={"APP_EXIT": "3"})
    assert done.returncode == 3
    assert "answer 42" in done.stdout


def test_uncaught_exception_exits_1_with_the_apps_traceback(project):
    done = flexos_run(project, "app.py", env={"APP_RAISE": "1"})
    assert done.returncode == 1
    assert "answer 42" in done.stdout
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: boom from the app" in done.stderr
    assert "app.py" in done.stderr


def test_run_module(project):
    package = project / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        textwrap.dedent(
            """
            import sys
            import sqlite3

            print("name", __name__)
            print("gate", sqlite3)
            print("argv", sys.argv[1:])
            sys.exit(5)
            """
        )
    )
    done = flexos_run(project, "-m", "pkg.mod", "one", "--two")
    assert done.returncode == 5, done.stderr
    assert done.stdout.splitlines() == [
        "name __main__",
        "gate <module 'sqlite3' in compartment 'db'>",
        "argv ['one', '--two']",
    ]


def test_other_config_file(project):
    (project / "other.yaml").write_text(IMAGE_YAML.format(name="elsewhere"))
    done = flexos_run(project, "-c", "other.yaml", "app.py")
    assert done.returncode == 0, done.stderr
    assert "gate <module 'sqlite3' in compartment 'elsewhere'>" in done.stdout.splitlines()


def test_apps_own_module_can_be_placed_in_a_compartment(tmp_path):
    """A module next to the script (found via sys.path[0]) runs in its compartment process."""
    (tmp_path / "flexos.yaml").write_text(IMAGE_YAML.format(name="db").replace("sqlite3", "helper"))
    (tmp_path / "helper.py").write_text("import os\n\ndef pid():\n    return os.getpid()\n")
    (tmp_path / "app.py").write_text(
        "import os\nimport helper\nprint('isolated', helper.pid() != os.getpid())\nprint('gate', helper)\n"
    )
    done = flexos_run(tmp_path, "app.py")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["isolated True", "gate <module 'helper' in compartment 'db'>"]


def test_missing_script_is_an_error(project):
    done = flexos_run(project, "no_such_app.py")
    assert done.returncode != 0
    assert "no_such_app.py" in done.stderr


def test_invalid_config_exits_2(project):
    (project / "broken.yaml").write_text("compartments: []\n")
    done = flexos_run(project, "-c", "broken.yaml", "app.py")
    assert done.returncode == 2
    assert "broken.yaml" in done.stderr
    assert done.stdout == ""
