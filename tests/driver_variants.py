"""The driver variants tests are parametrized over, importable by any test module.

Kept out of conftest.py: tests/security has a conftest of its own, and ``from conftest import``
would find whichever of the two was loaded last.
"""

from __future__ import annotations

import pytest

# Driver variants a test can be parametrized over: (driver, options).
DRIVER_VARIANTS: dict[str, tuple[str, dict]] = {
    "fcalls": ("fcalls", {}),
    "fcalls-strict": ("fcalls", {"strict": True}),
    "process": ("process", {}),
    "subinterp": ("subinterp", {}),
    "vm": ("vm", {}),
}


def needs(driver: str) -> list[pytest.MarkDecorator]:
    """Skip (printing why) where this machine cannot run ``driver``."""
    from flexos.drivers import unavailable

    reason = unavailable(driver)
    return [pytest.mark.skip(reason=f"driver {driver!r} unavailable here: {reason}")] if reason else []


GATED_DRIVERS = [
    "fcalls-strict",
    "process",
    pytest.param("subinterp", marks=needs("subinterp")),
    # A booted guest is reused from test to test (the vm driver's pool); each test restarts only the
    # compartment's Python inside it.
    pytest.param("vm", marks=[*needs("vm"), pytest.mark.slow]),
]
