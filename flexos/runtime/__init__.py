"""The runtime: boots an image in this process and keeps its compartments running.

``Runtime`` is what ``flexos run`` and the Python API use: it installs the gate finder, starts
compartments lazily on the first import that needs them, restarts crashed ones by policy, and
tears everything down on exit. A compartment runs one too, which reaches the other compartments
by the routes its boot record gives (:mod:`flexos.drivers.sibling`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import runpy
import sys
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from flexos.drivers import driver_class, unavailable
from flexos.drivers import names as driver_names
from flexos.drivers.base import Host
from flexos.drivers.sibling import SiblingBroker, SiblingDesk, SiblingDriver, route
from flexos.errors import ConfigError, DriverUnavailable, ProtocolError
from flexos.gates import stats as gate_stats
from flexos.gates.importer import GateFinder
from flexos.gates.link import Link
from flexos.gates.proxies import LINK_FINDERS, ModuleProxy
from flexos.image import Image, placement_refusal
from flexos.runtime import state
from flexos.runtime.compartment import Compartment
from flexos.runtime.stats import RunStats, collect
from flexos.transports import Transport
from flexos.wire.control import Route
from flexos.wire.frames import Op, checked_import_answer

__all__ = ["Compartment", "RunStats", "Runtime", "boot", "run_module", "run_path"]


def unsafe_image(image: Image) -> list[str]:
    """What an image built in Python (not read from flexos.yaml, whose rules refuse the same) asks
    for that would silently not isolate: a default compartment on a driver that cannot hold the
    app, a module that can never be placed."""
    problems = []
    default = image.compartments[image.default]
    try:
        holds_the_app = driver_class(default.driver).may_be_default
    except DriverUnavailable:  # an unknown driver: refused as such below
        holds_the_app = True
    if not holds_the_app:
        allowed = [name for name in driver_names() if driver_class(name).may_be_default]
        problems.append(
            f"{image.source}: compartment {default.name!r} is the default one, which is the app's own process; "
            f"give it driver {' or '.join(map(repr, allowed))} and isolate the other compartments"
        )
    for module in image.libraries:
        refusal = placement_refusal(module)
        if refusal is not None:
            problems.append(f"{image.source}: {refusal}")
    return problems


class Runtime:
    """An image booted in this process, which runs compartment ``local`` (the default one).

    The default compartment (the app) boots every other compartment, decides how each reaches the
    others (``routes_from``), relays what has no direct path and brokers what has; a compartment
    runs a Runtime too, with ``local`` set to its own name and ``routes`` from its boot record.

    ``stats``: the app's gates count what they carry, for :meth:`stats` (``flexos run --stats``).
    """

    def __init__(
        self, image: Image, local: str | None = None, routes: dict[str, str] | None = None, *, stats: bool = False
    ) -> None:
        self.image = image
        self.counting = stats
        self._began = 0.0
        self._final: RunStats | None = None
        self.local = local or image.default
        self.routes = routes or {}
        self.compartments: dict[str, Compartment] = {}
        #: The app's broker of direct sibling connections (None in a compartment).
        self.broker: SiblingBroker | None = None
        #: A compartment process's way to ask the app for siblings (set by flexos.runtime.child).
        self.siblings: SiblingDesk | None = None
        self._lock = threading.Lock()
        if self.local == image.default:
            refused = unsafe_image(image)
            if refused:
                raise ConfigError(refused)
            for name, spec in image.compartments.items():
                reason = unavailable(spec.driver)
                if reason:
                    raise DriverUnavailable(f"{image.source}: compartment {name!r}: {reason}")
                if name != self.local:
                    driver = driver_class(spec.driver)(spec, image, _DriverHost(self, name))
                    self.compartments[name] = compartment = Compartment(name, spec, driver)
                    compartment.on_start = partial(_share_interpreter_state, name, driver.in_app_process)
            self.broker = SiblingBroker(image, self.compartments)
        self.finder = GateFinder(image, self.local, self.compartment_for)
        #: Modules placed elsewhere that were loaded before the gates, out of sys.modules while we run.
        self.displaced: dict[str, types.ModuleType] = {}
        self.started = False

    def _link_for_unpickling(self, name: str) -> Link | None:
        """The live link to compartment ``name`` (restarted if need be), if this image runs one."""
        compartment = self.compartments.get(name)
        return None if compartment is None or name == self.local else compartment.link()

    def link_to(self, name: str, importer: Callable[[str], Any] | None = None) -> Link:
        """A new link to compartment ``name``, serving its imports (``importer``: ours, for it)."""
        return Link(
            name,
            importer=importer or self.importer_for(name),
            replicated=self.image.is_replicated,
            peer_is_app=name == self.image.default,
        )

    def link_parent(self, transport: Transport, importer: Callable[[str], Any]) -> Link:
        """In a compartment: reach the app (our parent) over ``transport``."""
        default = self.image.default
        link = self.link_to(default, importer)
        link.attach(transport)
        self.compartments[default] = Compartment(default, link=link)
        return link

    def compartment_for(self, owner: str) -> Compartment:
        """The compartment that serves modules placed in ``owner``, as reached from here."""
        compartment = self.compartments.get(owner)
        if compartment is not None:
            return compartment
        with self._lock:
            if owner not in self.compartments:
                self.compartments[owner] = self._reach(owner)
            return self.compartments[owner]

    def _reach(self, owner: str) -> Compartment:
        """In a compartment: a handle on compartment ``owner``, by the route the app gave for it.

        What the reach policy refuses is refused here first, to say so plainly; the app, which
        serves, relays and brokers every reach, refuses it whatever this side does."""
        refusal = self.image.reach_refusal(self.local, owner)
        if refusal is not None:
            raise ImportError(refusal)
        if self.routes[owner] != Route.DIRECT:  # the app relays to its gate, or runs the module itself
            return Compartment(owner, link=self.compartments[self.image.default].link())
        if self.siblings is None:
            raise ProtocolError(f"the boot record routes {owner!r} directly, but this compartment cannot ask for it")
        spec = self.image.compartments[owner]
        return Compartment(owner, spec, SiblingDriver(spec, self.image, _DriverHost(self, owner), desk=self.siblings))

    def routes_from(self, name: str) -> dict[str, str]:
        """In the app: how compartment ``name`` reaches each other compartment (its boot record's table)."""
        drivers = {other: each.driver for other, each in self.compartments.items() if each.driver is not None}
        source = drivers[name]
        return {other: route(source, driver) for other, driver in drivers.items() if other != name}

    def start(self) -> Runtime:
        if self.started:
            return self
        if self.counting:
            gate_stats.enable()  # before any compartment starts: only links made now count
            self._final = None
            self._began = time.perf_counter()
        sys.meta_path.insert(0, self.finder)
        self._displace_loaded_modules()
        self.started = True
        _running.add(self)
        if self.local == self.image.default:  # what the app pickled of a compartment's object comes back there
            LINK_FINDERS.append(self._link_for_unpickling)
        return self

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        _running.discard(self)
        if self._link_for_unpickling in LINK_FINDERS:
            LINK_FINDERS.remove(self._link_for_unpickling)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        for name, module in list(sys.modules.items()):
            if isinstance(module, ModuleProxy):
                del sys.modules[name]
        for name, module in self.displaced.items():
            sys.modules.setdefault(name, module)
        self.displaced.clear()
        if self.counting:  # while the links still hold their proxies
            self._final = self.stats()
            gate_stats.disable()
        for compartment in self.compartments.values():
            compartment.stop()

    def stats(self) -> RunStats:
        """What the app's gates carried since :meth:`start` (until :meth:`stop`), per compartment."""
        if self._final is not None:
            return self._final
        if not self.counting:
            raise RuntimeError("this runtime does not count: boot it with stats=True (flexos run --stats)")
        return collect(self.compartments, time.perf_counter() - self._began)

    def _displace_loaded_modules(self) -> None:
        """Take the modules placed in another (isolated) compartment out of ``sys.modules``, so
        that the next import of each gets its gate, not the local copy loaded before the gates
        existed (by flexos's own start-up, or by the app before it booted us). The code that
        already holds one keeps it (flexos's machinery); :meth:`stop` puts them back."""
        for name, module in list(sys.modules.items()):
            owner = self.image.compartment_of(name)
            if owner is None or owner == self.local or isinstance(module, ModuleProxy):
                continue
            handle = self.compartments.get(owner)
            if handle is not None and handle.direct:
                continue
            self.displaced[name] = sys.modules.pop(name)

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- serving peers --------------------------------------------------------------------------
    def importer_for(self, requester: str) -> Callable[[str], Any]:
        """What serves compartment ``requester``'s imports from here."""
        return partial(self.serve_import, requester=requester)

    def serve_import(self, name: str, requester: str) -> Any:
        """Import module ``name`` for compartment ``requester``.

        A module placed here is imported. The app also serves modules placed in any compartment
        but the requester's own: it hands out its own gate (so each call is relayed), never the
        module, unless that compartment runs in the app's process unisolated (plain fcalls).
        Either only if the requester may reach the module's compartment (``Image.may_reach``).
        """
        if name == state.__name__ and requester == self.image.default:  # the app shares its warnings etc.
            return state
        owner = self.image.compartment_of(name)
        refusal = self.image.reach_refusal(requester, owner, name) if owner is not None else None
        if refusal is not None:
            raise ImportError(refusal, name=name)
        if owner == self.local:
            return importlib.import_module(name)
        target = None
        if owner is not None and owner != requester and self.local == self.image.default:
            target = self.compartments.get(owner)
        if target is None:
            raise ImportError(f"module {name!r} is not placed in compartment {self.local!r}", name=name)
        if target.direct:
            return importlib.import_module(name)
        spec = self.finder.find_spec(name)  # a fresh gate: sys.modules may hold the module itself
        if spec is None or spec.loader is None:
            raise ImportError(f"module {name!r} is not placed in compartment {owner!r}", name=name)
        gate = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gate)
        return gate


def _share_interpreter_state(name: str, on_app_threads: bool, link: Link) -> None:
    """Have compartment ``name``'s warnings, log records and prints reach the app's, and Ctrl-C
    its code if it runs on the app's threads (flexos/runtime/state.py)."""
    module = checked_import_answer(link.call(Op.IMPORT, state.__name__), name)[0]
    own_interpreter = module.install(state.interpreter(), state.AppState)
    if own_interpreter and on_app_threads:
        state.interrupt_on_ctrl_c(name, module.interrupt)


class _DriverHost(Host):
    """The runtime as the driver of one compartment sees it: a peer's imports are served knowing who asks."""

    def __init__(self, runtime: Runtime, compartment: str) -> None:
        self._runtime = runtime
        self._compartment = compartment

    def serve_import(self, name: str) -> Any:
        return self._runtime.serve_import(name, self._compartment)

    def bypass_gates(self, owner: str) -> Any:
        return self._runtime.finder.bypass(owner)

    def control(self, compartment: str, message: bytes, fds: list[int]) -> None:
        broker = self._runtime.broker
        if broker is None:
            super().control(compartment, message, fds)
        else:
            broker.on_control(compartment, message, fds)

    def routes(self) -> dict[str, str]:
        return self._runtime.routes_from(self._compartment)


_running: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _forget_after_fork() -> None:
    """A forked child shares the parent's channels; it must boot compartments of its own."""
    for runtime in list(_running):
        for compartment in runtime.compartments.values():
            compartment.forget()


def _warn_before_fork() -> None:
    """CPython 3.13 aborts a forked child while subinterpreters exist: say why, before it does."""
    for runtime in list(_running):
        for name, compartment in runtime.compartments.items():
            driver = compartment.driver
            if driver is not None and driver.fork_aborts_child and compartment.running:
                warnings.warn(
                    f"fork() while {driver.name} compartment {name!r} is running: CPython deletes subinterpreters "
                    "in the child and 3.13 aborts doing so. Start children with subprocess or the 'spawn'/"
                    "'forkserver' multiprocessing start methods, or stop the runtime before fork().",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return


os.register_at_fork(before=_warn_before_fork, after_in_child=_forget_after_fork)


def boot(image: Image, stats: bool = False) -> Runtime:
    """Boot ``image`` in this process and return its running :class:`Runtime` (``stats``: its
    gates count, see :meth:`Runtime.stats`).

    Use it as a context manager; imports made inside go through the gates::

        with flexos.runtime.boot(image):
            import sqlite3          # a gate to the compartment sqlite3 is placed in
    """
    return Runtime(image, stats=stats).start()


Report = Callable[[RunStats], None]


def run_path(path: str, args: list[str], image: Image, report: Report | None = None) -> None:
    """Run a script unmodified under ``image``, as ``python path args...`` would; ``report``
    gets the run's gate statistics once the runtime has stopped, however the script ended."""
    sys.argv = [path, *args]
    sys.path[0] = str(Path(path).resolve().parent)
    runtime = boot(image, stats=report is not None)
    try:
        with runtime:
            runpy.run_path(path, run_name="__main__")
    finally:
        if report is not None:
            report(runtime.stats())


def run_module(module: str, args: list[str], image: Image, report: Report | None = None) -> None:
    """Run a module unmodified under ``image``, as ``python -m module args...`` would (``report``:
    as :func:`run_path`)."""
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()
    runtime = boot(image, stats=report is not None)
    try:
        with runtime:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        if report is not None:
            report(runtime.stats())
