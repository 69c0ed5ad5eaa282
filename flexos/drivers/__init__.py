"""Isolation mechanisms, one module per driver behind :class:`flexos.drivers.base.Driver`.

The registry below is the only list of drivers: flexos.yaml's ``driver:`` names, in the order
messages list them. A driver class says everything else (capabilities, options, availability);
its module is imported on first use, so a compartment loads only the drivers it runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flexos.errors import DriverUnavailable

if TYPE_CHECKING:
    from flexos.drivers.base import Driver

_REGISTRY = {
    "fcalls": "flexos.drivers.fcalls:FcallsDriver",
    "process": "flexos.drivers.process:ProcessDriver",
    "subinterp": "flexos.drivers.subinterp:SubinterpDriver",
    "vm": "flexos.drivers.vm:VmDriver",
    "intel-pku": "flexos.drivers.pku:PkuDriver",
}


def names() -> list[str]:
    """Every driver flexos.yaml may name, in the registry's order."""
    return list(_REGISTRY)


def driver_class(name: str) -> type[Driver]:
    """The class of driver ``name``; DriverUnavailable if there is no such driver."""
    where = _REGISTRY.get(name) if isinstance(name, str) else None
    if where is None:
        raise DriverUnavailable(f"unknown driver {name!r}")
    module, _, attribute = where.partition(":")
    return getattr(importlib.import_module(module), attribute)


def unavailable(name: str, options: Mapping[str, Any] | None = None) -> str | None:
    """Why driver ``name`` (with ``options``, flexos.yaml's, when given) cannot run here, or None."""
    try:
        cls = driver_class(name)
    except DriverUnavailable as exc:
        return str(exc)
    return cls.unavailable(None if options is None else cls.read_options(options))
