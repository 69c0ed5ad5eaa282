"""How compartments reach each other: the route of every pair, and the broker of direct connections.

Only the app (the default compartment) boots compartments, so it decides how each one reaches
every other (:func:`route`) and writes that table into the compartment's boot record:

- two compartments whose drivers both take direct sibling connections (process and process) get a
  connection of their own. Asked by compartment B for X, the app's :class:`SiblingBroker` boots X
  if needed and hands B and X the two ends of a fresh socketpair, over which they open
  shared-memory channels as the process driver does (:class:`SiblingDesk` is B's and X's side);
- every other pair goes through the app, which hands B its own gate to X's module: each call is
  relayed, two crossings instead of one (a compartment in the app's process without a gate,
  plain fcalls, is reached the same way; the app then hands out the module itself).

If X dies, B's direct link breaks and the next use asks the app again (which restarts X); a
relayed call meets the app's gate, which restarts X itself. Either way restarts work as for any
other driver.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from flexos.drivers.base import Driver
from flexos.errors import CompartmentCrashed, CompartmentStartError, ProtocolError
from flexos.gates.link import Link
from flexos.transports.shm import ShmTransport
from flexos.wire import control
from flexos.wire.control import Route

if TYPE_CHECKING:
    from flexos.image import Image
    from flexos.runtime.compartment import Compartment

_SIBLING_TIMEOUT_S = 60


def route(source: Driver, target: Driver) -> str:
    """How the compartment ``source`` boots reaches the modules of the one ``target`` boots."""
    if target.direct:  # its modules are imported for real into the app's process
        return Route.IN_APP
    if source.direct_siblings and target.direct_siblings:
        return Route.DIRECT
    return Route.VIA_APP


class SiblingBroker:
    """The app's side: connects two compartments that route to each other directly, if the first may
    reach the second (the image's reach policy, never the requester's word)."""

    def __init__(self, image: Image, compartments: Mapping[str, Compartment]) -> None:
        self._image = image
        self._compartments = compartments

    def on_control(self, requester: str, message: bytes, fds: list[int]) -> None:
        """A control message from compartment ``requester`` (the app takes no descriptors)."""
        for fd in fds:
            os.close(fd)
        try:
            request = control.read_sibling_message(message)
        except ProtocolError:
            return
        if request.verb == control.CONNECT:  # booting the sibling may take a while: not on the accept loop
            threading.Thread(
                target=self._connect, args=(requester, request.name), daemon=True, name="flexos-broker"
            ).start()

    def _connect(self, requester: str, target: str) -> None:
        asking = self._compartments.get(requester)
        if asking is None or asking.driver is None:
            return
        asker = asking.driver
        try:
            wanted = self._compartments.get(target)
            served = wanted.driver if wanted is not None else None
            if wanted is None or served is None or target == requester or route(asker, served) != Route.DIRECT:
                raise ImportError(f"compartment {target!r} cannot be connected to {requester!r}")
            refusal = self._image.reach_refusal(requester, target)
            if refusal is not None:
                raise ImportError(refusal)
            wanted.link()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                served.send_control(control.peer(requester), [theirs.fileno()])
                asker.send_control(control.peer(target), [ours.fileno()])
            finally:
                ours.close()
                theirs.close()
        except Exception as exc:
            try:
                asker.send_control(control.refused(target, str(exc)))
            except Exception:
                pass


class SiblingDesk:
    """A compartment process's side: asks the app for siblings, and serves siblings that connect to it.

    ``make_link(name)`` makes this compartment's link to sibling ``name`` (importer and all).
    """

    def __init__(self, parent: ShmTransport, spin_us: float, make_link: Callable[[str], Link]) -> None:
        self._parent = parent
        self._spin_us = spin_us
        self._make_link = make_link
        self._pending: dict[str, queue.Queue] = {}

    def request(self, name: str) -> socket.socket:
        """A connected socket to sibling ``name``, from the app (which boots it if needed)."""
        answers: queue.Queue = queue.Queue()
        self._pending[name] = answers
        try:
            self._parent.send_control(control.connect(name))
            answer = answers.get(timeout=_SIBLING_TIMEOUT_S)
        except queue.Empty:
            raise CompartmentStartError(f"no connection to compartment {name!r} within {_SIBLING_TIMEOUT_S} s")
        finally:
            self._pending.pop(name, None)
        if not isinstance(answer, socket.socket):
            raise CompartmentStartError(f"the default compartment refused a connection to {name!r}: {answer}")
        return answer

    def carry(self, name: str, sock: socket.socket, link: Link) -> ShmTransport:
        """Run ``link`` over ``sock``, a connection to sibling ``name``."""
        transport = ShmTransport(
            sock,
            sock.fileno(),
            0,  # only hang-ups: the sibling dying closes its end
            death=lambda: CompartmentCrashed(name, None, "the connection to it was lost"),
            spin_us=self._spin_us,
        )
        transport.run(link, name=f"flexos-{name}")
        return transport

    def on_control(self, message: bytes, fds: list[int]) -> None:
        """A control message from the app: the answer to a request, or a sibling connecting to us."""
        try:
            answer = control.read_sibling_message(message)
        except ProtocolError:
            answer = None
        pending = self._pending.get(answer.name) if answer is not None else None
        if answer is not None and answer.verb == control.PEER and len(fds) == 1:
            sock = socket.socket(fileno=fds[0])
            if pending is not None:
                pending.put(sock)
            else:  # it asked for us: serve its calls (ours to it go over a connection we ask for)
                self.carry(answer.name, sock, self._make_link(answer.name))
            return
        for fd in fds:
            os.close(fd)
        if answer is not None and answer.verb == control.REFUSED and pending is not None:
            pending.put(answer.reason or "no reason given")


class SiblingDriver(Driver):
    """A sibling reached directly: its connection comes from the app's broker, not from booting it."""

    def __init__(self, *args, desk: SiblingDesk, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._desk = desk
        self._transport: ShmTransport | None = None

    def start(self, mirrors: dict) -> Link:
        name = self.spec.name
        sock = self._desk.request(name)
        link = self.make_link(mirrors)
        self._transport = self._desk.carry(name, sock, link)
        return link

    def forget(self) -> bool:
        if self._transport is not None:
            self._transport.forget()
            self._transport = None
        return True

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
