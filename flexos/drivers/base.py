"""The one small interface every isolation mechanism implements (cf. RLBox's sandbox backends)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from flexos.gates.link import Link
    from flexos.image import CompartmentSpec, Image


class Host(ABC):
    """What a driver may ask of the runtime that boots it."""

    @abstractmethod
    def serve_import(self, name: str) -> Any:
        """Import a module placed in this process's compartment for a peer that asked for it."""

    @abstractmethod
    def bypass_gates(self) -> Any:
        """Context manager: imports in this thread load real modules, not gates."""


class Driver(ABC):
    """Boots one compartment and returns the link its gates go through."""

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
    def start(self, exception_classes: dict) -> Link:
        """Boot the compartment. ``exception_classes`` keeps mirrored exception classes stable
        across restarts so that ``except lib.Error`` keeps matching."""

    @abstractmethod
    def stop(self) -> None:
        """Shut the compartment down; safe to call on a dead or never-started compartment."""

    @property
    def pid(self) -> int | None:
        """The OS process the compartment runs in, when it has its own."""
        return None
