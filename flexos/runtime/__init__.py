"""The runtime: boots an image in this process and keeps its compartments running.

``Runtime`` is what ``flexos run`` and the Python API use: it installs the gate finder, starts
compartments lazily on the first import that needs them, restarts crashed ones by policy, and
tears everything down on exit.
"""

from __future__ import annotations

import importlib
import os
import queue
import runpy
import socket
import sys
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

from flexos.drivers import driver_class, unavailable
from flexos.drivers.base import Driver, Host
from flexos.drivers.sibling import SiblingDriver
from flexos.errors import CompartmentCrashed, CompartmentStartError, DriverUnavailable
from flexos.gates.importer import GateFinder
from flexos.gates.link import Link
from flexos.gates.proxies import ModuleProxy
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image
from flexos.transports.shm import ShmTransport
from flexos.wire.frames import Op, checked_import_answer


class Compartment:
    """One compartment as seen from this process: its driver, its current link, its modules."""

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

    @property
    def direct(self) -> bool:
        return self.driver is not None and self.driver.direct

    @property
    def pid(self) -> int | None:
        return self.driver.pid if self.driver else None

    def link(self) -> Link:
        """The live link, booting or restarting the compartment if needed."""
        link = self._link
        if link is not None and not link.closed:
            return link
        with self._lock:
            link = self._link
            if link is not None and not link.closed:
                return link
            if self.driver is None or (link is not None and self.spec.restart == "never"):
                raise link._closed_error()
            if link is not None:
                self.driver.stop()
            self._modules.clear()
            link = self.driver.start(self._mirrors)
            link.rebind = self._rebind
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


class Runtime(Host):
    """An image booted in this process, which runs compartment ``local`` (the default one).

    The default compartment boots every other compartment and brokers connections between
    them; a compartment process runs a Runtime too, with ``local`` set to its own name.
    """

    def __init__(self, image: Image, local: str | None = None) -> None:
        self.image = image
        self.local = local or image.default
        self.compartments: dict[str, Compartment] = {}
        self._lock = threading.Lock()
        self._parent: ShmTransport | None = None
        self._sibling_requests: dict[str, queue.Queue] = {}
        if self.local == image.default:
            for name, spec in image.compartments.items():
                reason = unavailable(spec.driver)
                if reason:
                    raise DriverUnavailable(f"{image.source}: compartment {name!r}: {reason}")
                if name != self.local:
                    self.compartments[name] = Compartment(name, spec, driver_class(spec.driver)(spec, image, self))
        self.finder = GateFinder(image, self.local, self.compartment_for)
        self.started = False

    def connect(self, name: str, link: Link, transport: ShmTransport | None) -> None:
        """Reach compartment ``name`` (our parent) through an existing link (its control channel
        brokers siblings; a subinterp compartment has none)."""
        self.compartments[name] = Compartment(name, link=link)
        self._parent = transport

    def compartment_for(self, owner: str) -> Compartment:
        """The compartment that serves modules placed in ``owner``, as reached from here."""
        compartment = self.compartments.get(owner)
        if compartment is not None:
            return compartment
        spec = self.image.compartments[owner]
        if spec.driver == "fcalls":  # it lives inside the default compartment's process
            return self.compartments[self.image.default]
        with self._lock:
            if owner not in self.compartments:
                self.compartments[owner] = Compartment(owner, spec, SiblingDriver(spec, self.image, self))
            return self.compartments[owner]

    def start(self) -> Runtime:
        if self.started:
            return self
        sys.meta_path.insert(0, self.finder)
        self.started = True
        _running.add(self)
        return self

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        _running.discard(self)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        for name, module in list(sys.modules.items()):
            if isinstance(module, ModuleProxy):
                del sys.modules[name]
        for compartment in self.compartments.values():
            compartment.stop()

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- Host ---------------------------------------------------------------------------------
    def serve_import(self, name: str) -> Any:
        owner = self.image.compartment_of(name)
        if owner != self.local:
            compartment = self.compartments.get(owner) if owner else None
            if self.local != self.image.default or compartment is None or compartment.spec.driver != "fcalls":
                raise ImportError(f"module {name!r} is not placed in compartment {self.local!r}", name=name)
            if not compartment.direct:  # strict fcalls: hand out its gate, never the bare module
                return compartment.module_object(name)
        return importlib.import_module(name)

    def bypass_gates(self, owner: str) -> Any:
        return self.finder.bypass(owner)

    def control(self, compartment: str, message: bytes, fds: list[int]) -> None:
        verb, _, rest = message.decode("utf-8", "replace").partition(" ")
        name, _, reason = rest.partition(" ")  # "connect NAME", "peer NAME", "refused NAME REASON"
        if self.local == self.image.default:
            for fd in fds:
                os.close(fd)
            if verb == "connect":
                threading.Thread(target=self._broker, args=(compartment, name), daemon=True).start()
            return
        pending = self._sibling_requests.get(name)
        if verb == "peer" and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            if pending is not None:
                pending.put(sock)
            else:
                self._adopt_sibling(name, sock)
        else:
            for fd in fds:
                os.close(fd)
            if verb == "refused" and pending is not None:
                pending.put(reason or "no reason given")

    def _broker(self, requester: str, target: str) -> None:
        """Connect compartment ``requester`` to ``target`` (booting it if needed)."""
        asking = self.compartments.get(requester)
        if asking is None:
            return
        try:
            wanted = self.compartments.get(target)
            if wanted is None or target == requester or wanted.spec.driver == "fcalls":
                raise ImportError(f"compartment {target!r} cannot be connected to {requester!r}")
            wanted.link()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                wanted.driver.send_control(b"peer " + requester.encode(), [theirs.fileno()])
                asking.driver.send_control(b"peer " + target.encode(), [ours.fileno()])
            finally:
                ours.close()
                theirs.close()
        except Exception as exc:
            try:
                asking.driver.send_control(f"refused {target} {exc}".encode())
            except Exception:
                pass

    def request_sibling(self, name: str) -> socket.socket:
        if self._parent is None:  # a subinterp compartment: no control channel to ask for a sibling
            raise ImportError(
                f"compartment {name!r} cannot be reached from compartment {self.local!r}: a subinterp "
                "compartment reaches the app's compartment and fcalls compartments only",
                name=name,
            )
        answers: queue.Queue = queue.Queue()
        self._sibling_requests[name] = answers
        try:
            self._parent.send_control(b"connect " + name.encode())
            answer = answers.get(timeout=_SIBLING_TIMEOUT_S)
        except queue.Empty:
            raise CompartmentStartError(f"no connection to compartment {name!r} within {_SIBLING_TIMEOUT_S} s")
        finally:
            self._sibling_requests.pop(name, None)
        if not isinstance(answer, socket.socket):
            raise CompartmentStartError(f"the default compartment refused a connection to {name!r}: {answer}")
        return answer

    def _adopt_sibling(self, name: str, sock: socket.socket) -> None:
        """A sibling connected to us: serve it, and call back through the same connection."""
        link = Link(name, importer=self.serve_import, replicated=self.image.is_replicated)
        ShmTransport(
            sock, sock.fileno(), 0, death=lambda: CompartmentCrashed(name, None, "the connection to it was lost")
        ).run(link, name=f"flexos-{name}")
        with self._lock:
            self.compartments.setdefault(name, Compartment(name, link=link))


_SIBLING_TIMEOUT_S = 60
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
            live = compartment._link is not None and not compartment._link.closed
            if compartment.spec is not None and compartment.spec.driver == "subinterp" and live:
                warnings.warn(
                    f"fork() while subinterp compartment {name!r} is running: CPython deletes subinterpreters "
                    "in the child and 3.13 aborts doing so. Start children with subprocess or the 'spawn'/"
                    "'forkserver' multiprocessing start methods, or stop the runtime before fork().",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return


os.register_at_fork(before=_warn_before_fork, after_in_child=_forget_after_fork)


def boot(config: str | os.PathLike[str] | Image = DEFAULT_CONFIG) -> Runtime:
    """Boot an image in this process and return its running :class:`Runtime`.

    Use it as a context manager; imports made inside go through the gates::

        with flexos.boot("flexos.yaml"):
            import sqlite3          # a gate to the compartment sqlite3 is placed in
    """
    if not isinstance(config, Image):
        from flexos.config import load  # the YAML/validation stack is only needed here

        config = load(config)
    image = config
    return Runtime(image).start()


def run_path(path: str, args: list[str] = (), config: str | os.PathLike[str] | Image = DEFAULT_CONFIG) -> None:
    """Run a script unmodified under ``config``, as ``python path args...`` would."""
    sys.argv = [path, *args]
    sys.path[0] = str(Path(path).resolve().parent)
    with boot(config):
        runpy.run_path(path, run_name="__main__")


def run_module(module: str, args: list[str] = (), config: str | os.PathLike[str] | Image = DEFAULT_CONFIG) -> None:
    """Run a module unmodified under ``config``, as ``python -m module args...`` would."""
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()
    with boot(config):
        runpy.run_module(module, run_name="__main__", alter_sys=True)
