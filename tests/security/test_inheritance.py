"""What a compartment inherits from the app: nothing of its terminal, stdin, descriptors or start-up path.

The hostile library (tests/fixtures/inheritor.py) runs in a fully hardened ``process``
compartment. Before issue 12 it typed a command into the user's terminal (TIOCSTI on the
inherited stdin), read a secret file redirected into the app's stdin, and planted ``msgpack.py``
in the working directory, which its restarted successor imported before any hardening.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from boxes import app_script, booted, hardened, image

import flexos
from flexos import CompartmentSpec
from flexos.drivers import unavailable

HARDENED_BOX = image({"inheritor": "box"}, box=CompartmentSpec("box", "process", hardening=hardened()))


# Makes its terminal (fd 0, in the new session start_new_session gave it) the controlling one, then runs the app.
_TERMINAL_LAUNCHER = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _run_in_a_terminal(script: Path, timeout: float = 60) -> str:
    """Run ``script`` as an app whose controlling terminal is a new pty; everything it wrote there."""
    master, slave = pty.openpty()
    app = subprocess.Popen(
        [sys.executable, "-c", _TERMINAL_LAUNCHER, str(script)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while select.select([master], [], [], max(deadline - time.monotonic(), 0))[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the app and everything holding the terminal are gone
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        app.kill()
        app.wait()
    return output.decode(errors="replace")


def test_a_compartment_cannot_type_into_the_apps_terminal(tmp_path: Path) -> None:
    """TIOCSTI pushes input into a terminal: what it types, the user's shell runs after the app."""
    script = tmp_path / "app.py"
    script.write_text(
        app_script(
            HARDENED_BOX,
            """
            import json, os, select, time
            with flexos.boot(IMAGE):
                import inheritor
                print("typed", json.dumps(inheritor.inject("echo PWNED" + chr(10))), flush=True)
                time.sleep(0.3)
                ready = select.select([0], [], [], 1.0)[0]
                print("stdin", repr(os.read(0, 1024) if ready else b""), flush=True)
                print("box tty", inheritor.session()[2], flush=True)
            """,
        )
    )
    output = _run_in_a_terminal(script)
    typed = re.search(r"^typed (\{.*\})\r?$", output, re.MULTILINE)
    assert typed is not None, output
    assert "typed" not in json.loads(typed.group(1)).values(), output
    assert "stdin b''" in output and "box tty False" in output, output
    assert "PWNED" not in output  # neither echoed by the terminal nor read by the app


def test_a_secret_redirected_into_the_apps_stdin_stays_the_apps(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2\n")
    script = tmp_path / "app.py"
    script.write_text(
        app_script(
            HARDENED_BOX,
            """
            with flexos.boot(IMAGE):
                import inheritor
                print("box read", inheritor.read_stdin(), flush=True)
                print("app read", sys.stdin.read().encode(), flush=True)
            """,
        )
    )
    with secret.open() as stdin:
        done = subprocess.run([sys.executable, str(script)], stdin=stdin, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["box read b''", "app read b'hunter2\\n'"]


def test_a_compartment_has_its_own_session_and_none_of_the_apps_descriptors(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    with secret.open() as held, booted(HARDENED_BOX, ("inheritor",)):
        os.set_inheritable(held.fileno(), True)
        import inheritor

        session, group, is_tty = inheritor.session()
        found = inheritor.descriptors()
    assert session not in (os.getsid(0), os.getpid()) and group == session and not is_tty
    assert found[0] == "/dev/null"
    assert found[1].startswith("pipe:") and found[2].startswith("pipe:")
    # The rest is flexos's own: its control and console sockets, channels (memfds, eventfds), the app's pidfd.
    flexos_own = re.compile(r"socket:|anon_inode:\[(eventfd|pidfd)\]|/memfd:flexos-")
    assert all(flexos_own.match(what) for fd, what in found.items() if fd > 2), found


def test_what_a_compartment_prints_during_a_call_comes_before_what_the_app_prints_after_it(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        app_script(
            HARDENED_BOX,
            """
            with flexos.boot(IMAGE):
                import inheritor
                for i in range(20):
                    print(f"app {i} before", flush=True)
                    print(f"app {i} before", file=sys.stderr, flush=True)
                    inheritor.chatter(f"box {i}")
                    print(f"app {i} after", flush=True)
                    print(f"app {i} after", file=sys.stderr, flush=True)
            """,
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for stream, suffix in ((done.stdout, "out"), (done.stderr, "err")):
        expected = [line for i in range(20) for line in (f"app {i} before", f"box {i} {suffix}", f"app {i} after")]
        assert stream.splitlines() == expected


@pytest.mark.parametrize("route", ["working directory", "PYTHONPATH"])
def test_planted_code_never_runs_before_the_hardening_of_a_restarted_compartment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The box may write ``work``; its successor starts there (or with it on PYTHONPATH)."""
    work, outside = tmp_path / "work", tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    marker = outside / "planted-code-ran"
    if route == "working directory":
        monkeypatch.chdir(work)
        policy = hardened(write=(work,))
    else:
        monkeypatch.setenv("PYTHONPATH", str(work))
        policy = {**hardened(write=(work,)), "env": "inherit"}  # a clean environment has no PYTHONPATH
    box = CompartmentSpec("box", "process", hardening=policy)
    with booted(image({"inheritor": "box"}, box=box), ("inheritor",)) as runtime:
        import inheritor

        assert inheritor.plant_msgpack(str(work), str(marker)) == "planted"
        first = runtime.compartments["box"].pid
        with pytest.raises(flexos.CompartmentCrashed):
            inheritor.crash()
        assert inheritor.session()[2] is False  # its successor answers ...
        assert runtime.compartments["box"].pid != first
        assert not marker.exists(), f"planted code ran in pid {marker.read_text()}"  # ... having run none of it
        assert inheritor.interpreter() == (1, 1, 1)  # isolated: no environment, no user site, no cwd on sys.path
    # The plant is live: a Python started the old way, in the same place, runs it.
    subprocess.run([sys.executable, "-c", "import msgpack"], cwd=work, check=True)
    assert marker.exists()


@pytest.mark.slow
def test_a_vm_compartments_qemu_holds_none_of_the_apps_terminal() -> None:
    """The guest's console is QEMU's serial port: stdin /dev/null, output a pipe the app logs; QEMU
    itself runs in a session of its own, so even a QEMU escape finds no terminal of the app's."""
    reason = unavailable("vm")
    if reason:
        pytest.skip(f"driver 'vm' unavailable here: {reason}")
    box = CompartmentSpec("box", "vm")
    with booted(image({"inheritor": "box"}, box=box), ("inheritor",)) as runtime:
        import inheritor

        inheritor.session()  # the guest is up and answers
        qemu = runtime.compartments["box"].pid
        assert qemu is not None
        assert os.getsid(qemu) == qemu != os.getsid(0)
        assert os.readlink(f"/proc/{qemu}/fd/0") == "/dev/null"
        assert all(os.readlink(f"/proc/{qemu}/fd/{fd}").startswith("pipe:") for fd in (1, 2))
