"""Reach policy: a compartment imports from another compartment only if flexos.yaml says it may.

The hostile library (tests/fixtures/reacher.py) runs in a fully hardened ``process`` compartment
``box`` that cannot read the secret itself. Before issue 12 it imported a module placed in an
unhardened compartment ``db`` (or in the app) and had it read the secret there. The app decides
(``serve_import`` for what it relays or serves, the broker for direct connections): the box's own
runtime refusing first is a courtesy, and a box that skips it is refused all the same.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from boxes import booted, hardened, image
from driver_variants import needs

import flexos
from flexos import CompartmentSpec

MODULES = ("reacher", "vault", "appfiles")
# The sibling holding ``vault``: a process is reached directly, a subinterp through the app.
ROUTES = [pytest.param("process", id="direct"), pytest.param("subinterp", id="via-app", marks=needs("subinterp"))]


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text("hunter2")
    return path


@pytest.fixture
def boot_box() -> Iterator[Callable[..., flexos.Runtime]]:
    """Boot ``box`` (the reacher; hardened unless told otherwise), ``db`` (the vault) and the app."""
    stack: list = []

    def _boot(db_driver: str = "process", reaches: tuple[str, ...] | None = None, hardening: bool = True):
        box = CompartmentSpec("box", "process", hardening=hardened() if hardening else {}, reaches=reaches)
        db = CompartmentSpec("db", db_driver)
        libraries = {"reacher": "box", "vault": "db", "appfiles": "app"}
        context = booted(image(libraries, box=box, db=db), MODULES)
        runtime = context.__enter__()
        stack.append(context)
        return runtime

    yield _boot
    for context in reversed(stack):
        context.__exit__(None, None, None)


def _refusal(target: str) -> str:
    return re.escape(f"compartment 'box' may not reach compartment {target!r}")


@pytest.mark.parametrize("db_driver", ROUTES)
def test_a_hardened_compartment_reaches_no_compartment_it_does_not_declare(boot_box, secret, db_driver) -> None:
    boot_box(db_driver)
    import reacher

    with pytest.raises(PermissionError):
        reacher.read_here(str(secret))  # its own hardening holds ...
    with pytest.raises(ImportError, match=_refusal("db")) as refused:
        reacher.read_through("vault", str(secret))  # ... and it cannot borrow db's
    assert "add 'db' to the reaches: list of compartment 'box' in <tests/security>" in str(refused.value)
    assert reacher.pid() > 0  # the box goes on, and so does the app, which reaches everything
    import vault

    assert vault.read(str(secret)) == "hunter2"


@pytest.mark.parametrize("db_driver", ROUTES)
def test_a_declared_reach_is_allowed(boot_box, secret, db_driver) -> None:
    boot_box(db_driver, reaches=("db",))
    import reacher

    assert reacher.read_through("vault", str(secret)) == "hunter2"
    with pytest.raises(ImportError, match=_refusal("app")):
        reacher.read_through("appfiles", str(secret))


def test_modules_placed_in_the_default_compartment_are_reached_only_when_declared(boot_box, secret) -> None:
    """An app module a compartment may import runs in the app, with the app's rights."""
    boot_box()
    import reacher

    with pytest.raises(ImportError, match=_refusal("app")):
        reacher.read_through("appfiles", str(secret))
    boot_box(reaches=("app",))
    import reacher

    assert reacher.read_through("appfiles", str(secret)) == "hunter2"


def test_the_app_refuses_a_compartment_that_skips_its_own_check(boot_box) -> None:
    boot_box("process")
    import reacher

    with pytest.raises(ImportError, match=_refusal("app") + re.escape(" (to import 'appfiles', placed there)")):
        reacher.ask_app_to_import("appfiles")  # served by the app
    with pytest.raises(ImportError, match=_refusal("db") + re.escape(" (to import 'vault', placed there)")):
        reacher.ask_app_to_import("vault")  # relayed by the app
    with pytest.raises(flexos.GateError, match="refused a connection to 'db': " + _refusal("db")):
        reacher.ask_app_to_connect("db")  # brokered by the app
    assert reacher.pid() > 0


def test_an_unhardened_compartment_reaches_every_compartment_unless_it_declares(boot_box, secret) -> None:
    """Undeclared, a compartment without hardening reaches all: it runs unconfined as the app's user,
    so refusing it a gate would confine nothing (it could rewrite the other compartments' code)."""
    boot_box(hardening=False)
    import reacher

    assert reacher.read_through("vault", str(secret)) == "hunter2"
    assert reacher.read_through("appfiles", str(secret)) == "hunter2"
    boot_box(hardening=False, reaches=())
    import reacher

    with pytest.raises(ImportError, match=_refusal("db")):
        reacher.read_through("vault", str(secret))
