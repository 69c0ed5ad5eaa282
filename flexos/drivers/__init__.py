"""Isolation mechanisms, one module per driver behind :class:`flexos.drivers.base.Driver`."""

from __future__ import annotations

import importlib

from flexos.errors import DriverUnavailable

_DRIVERS = {
    "fcalls": "flexos.drivers.fcalls:FcallsDriver",
    "process": "flexos.drivers.process:ProcessDriver",
    "subinterp": "flexos.drivers.subinterp:SubinterpDriver",
    "vm": "flexos.drivers.vm:VmDriver",
}


def unavailable(driver: str, options: dict | None = None) -> str | None:
    """Why ``driver`` (with ``options``, when given) cannot be used on this machine, or None."""
    if driver == "intel-pku":
        from flexos.probe import pku  # imported on use: compartment processes need not load ctypes

        keys = pku()
        if not keys.available:
            return (
                "intel-pku needs a CPU with memory protection keys (PKU); this CPU has none "
                f"({keys.detail}). Use driver 'process' instead."
            )
        return "intel-pku cannot separate Python objects; use driver 'process' instead."
    if driver == "vm":  # qemu, a kernel and busybox; an explicit accelerator must work here
        from flexos.vm.machine import unavailable as vm_unavailable

        return vm_unavailable(options)
    if driver not in _DRIVERS:
        return f"unknown driver {driver!r}"
    return driver_class(driver).unavailable()


def driver_class(driver: str):
    reason = None if driver in _DRIVERS else unavailable(driver)
    if reason:
        raise DriverUnavailable(reason)
    module, _, name = _DRIVERS[driver].partition(":")
    return getattr(importlib.import_module(module), name)
