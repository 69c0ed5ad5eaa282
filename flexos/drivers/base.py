"""The one small interface every isolation mechanism implements (cf. RLBox's sandbox backends)."""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from flexos.errors import DriverUnavailable
from flexos.wire.control import BootRecord

if TYPE_CHECKING:
    from flexos.gates.link import Link
    from flexos.image import CompartmentSpec, Image


class Host(ABC):
    """What a driver may ask of the runtime that boots its compartment."""

    @abstractmethod
    def serve_import(self, name: str) -> Any:
        """Import a module for the driver's compartment, which asked for it."""

    @abstractmethod
    def bypass_gates(self, owner: str) -> Any:
        """Context manager: in this thread, modules placed in ``owner`` load for real."""

    def control(self, compartment: str, message: bytes, fds: list[int]) -> None:
        """A compartment process sent a control message (e.g. asks to reach a sibling)."""
        for fd in fds:
            os.close(fd)

    @abstractmethod
    def routes(self) -> dict[str, str]:
        """How the driver's compartment reaches each other one (its boot record's route table)."""


class Driver(ABC):
    """Boots one compartment and returns the link its gates go through.

    A driver class is the only place that knows its mechanism: config, runtime, cli and explore
    ask these class attributes instead of comparing driver names.
    """

    #: The name flexos.yaml gives the driver (``mechanism: {driver: NAME}``).
    name: ClassVar[str]
    #: May back the default compartment, where the app's own code runs (only one that adds no
    #: boundary can: the app's code is in the app's process whatever the file says).
    may_be_default: ClassVar[bool] = False
    #: The compartment lives in the app's own process (it shares the app's address space).
    in_app_process: ClassVar[bool] = False
    #: Compartments of this driver can be connected to each other directly (without the app in
    #: between) by handing both a socket.
    direct_siblings: ClassVar[bool] = False
    #: ``hardening:`` can be enforced (the compartment has an OS process of its own).
    hardenable: ClassVar[bool] = False
    #: ``timeout:`` can be enforced (a stuck call runs on a thread that is not the caller's).
    supports_timeout: ClassVar[bool] = False
    #: How strong a boundary it puts around its compartment, for explore's safety order
    #: (0 = same compartment; a higher number separates more).
    strength: ClassVar[int] = 0
    #: The letter a configuration name writes for this driver (explore: ``R1pN2s``).
    letter: ClassVar[str] = ""

    #: CPython aborts a child forked while the compartment runs (the app is warned before fork()).
    fork_aborts_child: ClassVar[bool] = False

    #: The compartment's modules are imported directly: no gate, no link (fcalls, non-strict).
    direct: ClassVar[bool] = False

    def __init__(self, spec: CompartmentSpec, image: Image, host: Host) -> None:
        self.spec = spec
        self.image = image
        self.host = host

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this mechanism cannot run here, or None if it can."""
        return None

    @abstractmethod
    def start(self, mirrors: dict) -> Link:
        """Boot the compartment. ``mirrors`` keeps the local mirrors of its classes stable across
        restarts, so that ``except lib.Error`` and ``isinstance(x, lib.Thing)`` keep matching."""

    @abstractmethod
    def stop(self) -> None:
        """Shut the compartment down; safe to call on a dead or never-started compartment."""

    def forget(self) -> bool:
        """In a forked child of the app: let go of the parent's compartment without touching it.

        Returns True when the compartment belonged to the parent (the child must boot its own),
        False when it lives in this process's memory and stays usable (fcalls).
        """
        return False

    @property
    def pid(self) -> int | None:
        """The OS process the compartment runs in, when it has its own."""
        return None

    def boot_record(self, **mechanism: Any) -> BootRecord:
        """What the compartment is told when it starts; ``mechanism``: the driver's own fields."""
        return BootRecord(self.spec.name, self.image, list(sys.path), list(sys.argv), self.host.routes(), **mechanism)

    def send_control(self, message: bytes, fds: list[int] = ()) -> None:
        """Hand the compartment a control message (used to connect it to a sibling)."""
        raise DriverUnavailable(f"driver {self.spec.driver!r} cannot be connected to other compartments")
