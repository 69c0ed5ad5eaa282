"""``intel-pku``: FlexOS's Intel MPK backend, known by name and always refused, with the reason.

It needs a CPU with memory protection keys, and even on one flexos cannot keep a compartment's
Python objects on pages of their own, so the driver refuses either way: it says what the probe
found (:func:`flexos.probe.pku`) and which driver to use instead.
"""

from __future__ import annotations

from typing import Any, NoReturn

from flexos.drivers.base import Driver
from flexos.errors import DriverUnavailable


class PkuDriver(Driver):
    name = "intel-pku"
    implemented = False
    in_app_process = True
    large_buffers = "are not implemented"

    @classmethod
    def unavailable(cls, options: Any = None) -> str:
        from flexos.probe import pku  # imported on use: compartment processes need not load ctypes

        keys = pku()
        if not keys.available:
            return (
                "intel-pku needs a CPU with memory protection keys (PKU); this CPU has none "
                f"({keys.detail}). Use driver 'process' instead."
            )
        return "intel-pku cannot separate Python objects; use driver 'process' instead."

    def start(self, mirrors: dict) -> NoReturn:
        raise DriverUnavailable(self.unavailable())

    def stop(self) -> None:
        """Nothing ever started."""
