"""The hostile library ``attacker`` (tests/fixtures/attacker.py) booted in a process compartment."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

import flexos
from flexos import CompartmentSpec, Image


@pytest.fixture
def boot_attacker() -> Iterator[Callable[..., object]]:
    """Boot ``attacker`` in compartment ``box`` with the given hardening, timeout and restart policy."""
    runtimes: list[flexos.Runtime] = []

    def _boot(hardening: dict | None = None, timeout: float | None = None, restart: str = "on-failure") -> object:
        sys.modules.pop("attacker", None)
        box = CompartmentSpec("box", "process", restart=restart, timeout=timeout, hardening=hardening or {})
        image = Image(
            {"app": CompartmentSpec("app", "fcalls", default=True), "box": box},
            {"attacker": "box"},
            source="<tests/security>",
        )
        runtimes.append(flexos.boot(image))
        import attacker

        return attacker

    yield _boot
    for runtime in runtimes:
        runtime.stop()
    sys.modules.pop("attacker", None)
