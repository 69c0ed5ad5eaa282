"""The one small interface every isolation mechanism implements (cf. RLBox's sandbox backends)."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from flexos.drivers import driver_class
from flexos.errors import DriverUnavailable
from flexos.gates.link import Link
from flexos.wire.control import BootRecord

if TYPE_CHECKING:
    from flexos.image import CompartmentSpec, Image


# -- mechanism options ----------------------------------------------------------------------------
# A driver declares what ``mechanism:`` may say as one frozen dataclass (its ``Options``): one field
# per option, with its one default. Constraints flexos.yaml must respect go in the field's metadata,
# which flexos.config turns into its validation (so compartment processes, which import drivers,
# never load pydantic): ``ge``/``gt``/``le`` bound a number (floats are also finite), ``size``
# accepts ``512MiB`` and gives the minimum with the reason for it; Literal types are choices, a
# nested dataclass is a nested mapping.


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A mechanism that takes no options beyond ``driver``."""


def option(default: Any, **limits: float) -> Any:
    """A mechanism option with its default and the bounds (``ge``, ``gt``, ``le``) a value must keep."""
    return dataclasses.field(default=default, metadata=limits)


def size_option(default: int, minimum: int, why: str) -> Any:
    """A size in bytes (flexos.yaml may write ``512MiB``); ``why`` says what fails below ``minimum``."""
    return dataclasses.field(default=default, metadata={"size": (minimum, why)})


def spin_us_option() -> Any:
    """How long (µs) a caller polls shared memory for an answer before it sleeps on the peer."""
    from flexos.transports.shm import DEFAULT_SPIN_US  # only drivers over shared memory load it

    return option(DEFAULT_SPIN_US, ge=0, le=1_000_000)


def start_timeout_option() -> Any:
    """Seconds a new compartment has to say it is ready."""
    return option(30.0, gt=0, le=3600)


@functools.cache
def option_types(options: type) -> dict[str, Any]:
    """The resolved field types of an options dataclass (its module writes them as strings)."""
    return typing.get_type_hints(options)


def _from_mapping(options: type, values: Mapping[str, Any]) -> Any:
    """``values`` as an ``options`` dataclass (nested mappings as their nested dataclasses)."""
    types = option_types(options)
    return options(
        **{
            name: _from_mapping(types[name], value)
            if dataclasses.is_dataclass(types.get(name)) and isinstance(value, Mapping)
            else value
            for name, value in values.items()
        }
    )


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
    #: ``sharing: {buffers: view}`` is honoured: large bytes-like values cross between the app and
    #: the compartment as read-only views, not copies (the bulk port, flexos/transports/bulk.py:
    #: of the app's arena in the compartment, of the app's own copy in the app), immutable for both.
    buffer_views: ClassVar[bool] = False
    #: What its gates do with a large bytes-like value instead, as a refusal of ``buffers: view`` says.
    large_buffers: ClassVar[str] = "copy them"
    #: How strong a boundary it puts around its compartment, for explore's safety order
    #: (0 = same compartment; a higher number separates more).
    strength: ClassVar[int] = 0
    #: The letter a configuration name writes for this driver (explore: ``R1pN2s``).
    letter: ClassVar[str] = ""

    #: flexos can run this mechanism somewhere. False: a FlexOS backend known by name only, which
    #: ``unavailable()`` always refuses with the reason; explore leaves it out, and the default
    #: compartment rule leaves its refusal to ``flexos check`` and boot.
    implemented: ClassVar[bool] = True
    #: What ``mechanism:`` may say besides ``driver``: a frozen dataclass (see ``option`` above).
    Options: ClassVar[type] = NoOptions
    #: CPython aborts a child forked while the compartment runs (the app is warned before fork()).
    fork_aborts_child: ClassVar[bool] = False

    #: The compartment's modules are imported directly: no gate, no link (fcalls, non-strict).
    direct: ClassVar[bool] = False

    def __init__(self, spec: CompartmentSpec, image: Image, host: Host) -> None:
        self.spec = spec
        self.image = image
        self.host = host
        # The options of the spec's own driver: this class's, except for a connection to a sibling.
        self.options: Any = driver_class(spec.driver).read_options(spec.options)

    @classmethod
    def read_options(cls, values: Mapping[str, Any]) -> Any:
        """``values`` (flexos.yaml's, as an Image carries them) as this driver's ``Options``.

        Options left out get their defaults; a name ``Options`` does not declare is a TypeError.
        """
        return _from_mapping(cls.Options, values)

    @classmethod
    def unavailable(cls, options: Any = None) -> str | None:
        """Why this mechanism (with ``options``, an ``Options``, when given) cannot run here, or None."""
        return None

    @classmethod
    def describe(cls, options: Any) -> str | None:
        """What ``flexos check`` adds about a compartment with these ``options`` on this machine."""
        return None

    @classmethod
    def refuses(cls, extensions: dict[str, str]) -> dict[str, str]:
        """Of these extension modules (name -> file) placed in a compartment of this driver, the
        ones it cannot load, with why ({}: it loads any); ``flexos check`` asks, to say so early."""
        return {}

    @classmethod
    def predict(cls, modules: list[str]) -> list[str]:
        """What ``flexos check`` foresees for ``modules`` placed in a compartment of this driver on this
        machine (e.g. a C extension it cannot load), one note each; nothing by default."""
        return []

    def make_link(self, mirrors: dict) -> Link:
        """The link to this compartment: it may import what this process serves, and a call waits at
        most the compartment's ``timeout``."""
        link = Link(
            self.spec.name,
            importer=self.host.serve_import,
            mirrors=mirrors,
            replicated=self.image.is_replicated,
            app_side=True,
        )
        link.timeout = self.spec.timeout
        return link

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

    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """Hand the compartment a control message (used to connect it to a sibling)."""
        raise DriverUnavailable(f"driver {self.spec.driver!r} cannot be connected to other compartments")
