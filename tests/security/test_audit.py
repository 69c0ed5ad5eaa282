"""``audit: {deny}`` attributes events by code identity: plain Python cannot pass for flexos's own
machinery, and a thread is the code's that started it (tests/fixtures/auditdodger.py).

Before issue 12, code whose globals' ``__name__`` began with ``flexos`` was exempt, and a thread
started on ``os.system`` had only the standard library on its stack: both ran the command. These
compartments have every hardening option, but without seccomp and ``processes: 0``, and with
/usr/bin and /bin readable (so executable) under Landlock: these would refuse the command
themselves and hide whether the audit hook held (with them it fails all the same:
tests/security/test_hardening.py).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from boxes import booted, hardened, image

from flexos import CompartmentSpec, Image

ATTACKS = ["in_a_thread", "subprocess_in_a_thread", "in_a_raw_thread", "as_flexos", "as_flexos_file", "detonate"]


def _audited(out: Path, deny: tuple[str, ...] = ("subprocess",)) -> dict:
    """Full hardening but what would refuse the command itself: seccomp, processes: 0, Landlock's exec."""
    policy = hardened(read=(Path("/usr/bin"), Path("/bin")), write=(out,), audit=deny)
    return {**policy, "seccomp": None, "limits": {**policy["limits"], "processes": None}}


@pytest.fixture
def out(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.fixture
def dodger(out: Path) -> Iterator[object]:
    box = CompartmentSpec("box", "process", hardening=_audited(out))
    with booted(image({"auditdodger": "box"}, box=box), ("auditdodger",)):
        import auditdodger

        yield auditdodger


@pytest.mark.parametrize("attack", ATTACKS)
def test_plain_python_cannot_pass_for_flexos_or_the_standard_library(dodger, out: Path, attack: str) -> None:
    marker = out / "command-ran"
    if attack == "detonate":
        dodger.arm(str(marker))
        with pytest.raises(PermissionError, match=re.escape("'os.system' is denied in compartment 'box'")):
            dodger.detonate()  # flexos's dispatcher calls it: a C callable has no frame of its own
    else:
        outcome = getattr(dodger, attack)(str(marker))
        assert re.fullmatch(
            r"PermissionError: '(os\.system|subprocess\.Popen)' is denied in compartment 'box'.*", outcome
        )
    assert not marker.exists()
    assert dodger.pid() != os.getpid()  # the compartment goes on


def test_the_hooks_own_state_is_out_of_reach(dodger, out: Path) -> None:
    """The hook's deny sets live in its closure; gc leads there, and cells can be rewritten."""
    marker = out / "command-ran"
    with pytest.raises(PermissionError, match=re.escape("'gc.get_objects' is denied in compartment 'box': it reaches")):
        dodger.silence_the_hook(str(marker))
    assert not marker.exists()


def test_flexos_machinery_is_exempt_but_the_component_is_not(out: Path) -> None:
    """Denying what channels are made of (sockets, mmap, fcntl, os.*) still lets flexos import the
    component, open channels for a thread of it that calls the app back, and connect it to a
    sibling; the component itself is refused."""
    deny = ("subprocess", "socket", "mmap", "fcntl", "os", "open")
    box = CompartmentSpec("box", "process", hardening=_audited(out, deny), reaches=("db",))
    (out / "note.txt").write_text("read in db")
    libraries = {"auditdodger": "box", "vault": "db"}
    with booted(image(libraries, box=box, db=CompartmentSpec("db", "process")), ("auditdodger", "vault")):
        import auditdodger

        assert auditdodger.call_from_a_thread(lambda value: value * 2, 21) == [42]
        assert auditdodger.read_through("vault", str(out / "note.txt")) == "read in db"
        with pytest.raises(PermissionError, match=re.escape("'mmap.__new__' is denied in compartment 'box'")):
            auditdodger.own_mmap()


@pytest.fixture
def shared(out: Path) -> Iterator[tuple]:
    """auditdodger (under a library policy) and bystander (none) in one compartment."""
    modules = ("auditdodger", "bystander")
    box = CompartmentSpec("box", "process")
    libraries = {"auditdodger": {"audit": {"deny": ["subprocess"]}}}
    boot_image = Image(
        {"app": CompartmentSpec("app", "fcalls", default=True), "box": box},
        {"auditdodger": "box", "bystander": "box"},
        library_hardening=libraries,
    )
    with booted(boot_image, modules):
        import auditdodger
        import bystander

        yield auditdodger, bystander


@pytest.mark.parametrize("attack", ["in_a_thread", "subprocess_in_a_thread", "in_a_raw_thread", "as_flexos"])
def test_a_library_policy_follows_the_librarys_threads_and_code(shared, out: Path, attack: str) -> None:
    dodger, bystander = shared
    marker = out / "command-ran"
    outcome = getattr(dodger, attack)(str(marker))
    assert re.fullmatch(
        r"PermissionError: '(os\.system|subprocess\.Popen)' is denied for library 'auditdodger'.*", outcome
    )
    assert not marker.exists()
    assert bystander.spawn(["/bin/true"]) == 0  # same process, no policy of its own
    assert sys.modules["auditdodger"] is dodger
