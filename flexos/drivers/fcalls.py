"""``fcalls``: the compartment shares the caller's process; gates are plain function calls.

FlexOS's debugging backend and the zero-cost baseline. With ``strict: true`` every call still goes
through the real wire encoding (in-process, no copy to another process), so that whatever would
break under real isolation — an object that cannot cross, an identity or mutation assumption,
a missing gate — breaks here first.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass

from flexos.drivers.base import Driver
from flexos.gates.link import Link
from flexos.gates.proxies import ModuleProxy
from flexos.transports.loopback import LoopbackTransport


@dataclass(frozen=True)
class FcallsOptions:
    strict: bool = False  # every call still goes through the real wire encoding


class FcallsDriver(Driver):
    name = "fcalls"
    may_be_default = True
    in_app_process = True
    large_buffers = "pass the app's own objects (copies of them with strict: true)"
    strength = 1
    letter = "f"
    Options = FcallsOptions
    options: FcallsOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Modules of this compartment, kept out of sys.modules so the app only sees their gates.
        self._modules: dict[str, types.ModuleType] = {}
        self._links: tuple[Link, Link] | None = None

    @property
    def direct(self) -> bool:  # type: ignore[override]
        return not self.options.strict

    def start(self, mirrors: dict) -> Link:
        caller = Link(self.spec.name, mirrors=mirrors, replicated=self.image.is_replicated, app_side=True)
        compartment = Link(
            self.image.default, importer=self._import, replicated=self.image.is_replicated, peer_is_app=True
        )
        caller.attach(LoopbackTransport(compartment.dispatch))
        compartment.attach(LoopbackTransport(caller.dispatch))
        self._links = (caller, compartment)
        return caller

    def _import(self, name: str) -> object:
        module = self._modules.get(name)
        if module is not None:
            return module
        # The import runs as if in the compartment: its modules imported so far are in sys.modules
        # in place of the app's gates (a submodule needs its real parent package), then all go back.
        gates = {key: sys.modules.pop(key) for key in self._modules if key in sys.modules}
        sys.modules.update(self._modules)
        try:
            with self.host.bypass_gates(self.spec.name):
                module = importlib.import_module(name)
        finally:
            for key, loaded in list(sys.modules.items()):
                if self.image.compartment_of(key) == self.spec.name and not isinstance(loaded, ModuleProxy):
                    self._modules[key] = sys.modules.pop(key)
            sys.modules.update(gates)
        return module

    def stop(self) -> None:
        if self._links:
            for link in self._links:
                link.close()
        self._links = None
