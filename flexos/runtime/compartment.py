"""One compartment as this process reaches it: its driver (if this process boots it), its link, its modules.

The gates' importer and module proxies hold these handles; the runtime makes one per compartment
it reaches and restarts the compartment through it when its link has closed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flexos.wire.frames import Op, checked_import_answer

if TYPE_CHECKING:
    from flexos.drivers.base import Driver
    from flexos.gates.link import Link
    from flexos.image import CompartmentSpec


VERBOSE = "FLEXOS_VERBOSE"  # set (``flexos run -v`` does): the boundaries are logged to stderr


def log_boundary(message: str) -> None:
    """Tell the user where a boundary was crossed or drawn (gated imports, starts, restarts,
    denials), if they asked to see them."""
    if os.environ.get(VERBOSE):
        print(f"flexos[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


class Compartment:
    """A compartment's handle: booted by ``driver`` (restarted per ``spec.restart``), or reached
    over an existing ``link`` (the parent, an adopted sibling, a relay through the app)."""

    def __init__(
        self, name: str, spec: CompartmentSpec | None = None, driver: Driver | None = None, link: Link | None = None
    ) -> None:
        self.name = name
        self.spec = spec
        self.driver = driver
        self._link = link
        self._lock = threading.Lock()
        self._modules: dict[str, tuple[Link, Any]] = {}
        self._mirrors: dict = {}
        #: Called with each new link, before any module is imported through it (set by the app's runtime).
        self.on_start: Callable[[Link], None] | None = None
        self.starts = 0  # links made by the driver, restarts included
        self.restarts = 0  # of those, the ones that replaced a closed link (flexos run --stats)
        self.start_seconds = 0.0  # spent in the driver's start, every start together

    @property
    def direct(self) -> bool:
        return self.driver is not None and self.driver.direct

    @property
    def pid(self) -> int | None:
        return self.driver.pid if self.driver else None

    @property
    def current_link(self) -> Link | None:
        """The link made last, live or closed (None before the first start and after stop)."""
        return self._link

    @property
    def running(self) -> bool:
        return self._link is not None and not self._link.closed

    def link(self) -> Link:
        """The live link, booting or restarting the compartment if needed."""
        link = self._link
        if link is not None and not link.closed:
            return link
        with self._lock:
            link = self._link
            if link is not None and not link.closed:
                return link
            driver = self.driver
            if link is not None and (driver is None or self.spec is None or self.spec.restart == "never"):
                raise link.closed_error()
            if driver is None:  # a handle without a driver is always made with its link
                raise RuntimeError(f"compartment {self.name!r} has neither a link nor a driver")
            if link is not None:
                log_boundary(f"restarting compartment {self.name!r}: {link.closed_error()}")
                driver.stop()
            self._modules.clear()
            started = time.perf_counter()
            link = driver.start(self._mirrors)
            self.start_seconds += time.perf_counter() - started
            self.starts += 1
            self.restarts += self._link is not None  # the closed link it replaces
            if os.environ.get(VERBOSE):
                how = self.spec.driver if self.spec is not None else "reached"
                log_boundary(f"started compartment {self.name!r} ({how}" + (f", pid {self.pid})" if self.pid else ")"))
            link.rebind = self._rebind
            if self.on_start is not None:
                self.on_start(link)
            self._link = link
            return link

    def _rebind(self, module: str, qualname: str) -> Any:
        """Look a class up by name in the current instance (re-pointing its local mirror)."""
        obj = self.module_object(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj

    def import_module(self, name: str) -> tuple[bool, list[str]]:
        link = self.link()
        module, is_package, names = checked_import_answer(link.call(Op.IMPORT, name), self.name)
        self._modules[name] = (link, module)
        log_boundary(
            f"import {name!r}: a gate to compartment {self.name!r}" + (f" (pid {self.pid})" if self.pid else "")
        )
        return is_package, names

    def module_object(self, name: str) -> Any:
        link = self.link()
        entry = self._modules.get(name)
        if entry is None or entry[0] is not link:
            self.import_module(name)
            entry = self._modules[name]
        return entry[1]

    def forget(self) -> None:
        """In a forked child: drop what belongs to the parent; the next use boots our own."""
        self._lock = threading.Lock()  # another thread of the parent may have held it at fork()
        if self.driver is not None and not self.driver.forget():
            return  # it lives in this process's memory and still works
        if self._link is not None:
            self._link.forget()
        if self.driver is not None:  # a fresh start on next use, whatever the restart policy
            self._link = None
        self._modules.clear()

    def stop(self) -> None:
        if self.driver is not None:
            self.driver.stop()
        if self._link is not None:
            self._link.close()
            self._link = None
