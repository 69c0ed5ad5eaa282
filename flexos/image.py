"""The image: which compartments exist, how each is isolated, and which modules live where.

This is the validated, resolved form of flexos.yaml (the FlexOS kraft.yaml ``compartments:`` and
``libraries:`` sections). It has no dependencies beyond the standard library so a compartment
process can rebuild it from a plain dict without loading the YAML and validation stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONFIG = "flexos.yaml"
# The largest frame (a reply, or a call it makes back) the app accepts from a compartment: a
# multiple of the channels' 1 MiB fragments, far above what a call's result needs, and small
# enough that a compartment cannot make the app hold more than 2x this per channel.
DEFAULT_MAX_REPLY = 64 << 20


@dataclass(frozen=True)
class CompartmentSpec:
    name: str
    driver: str
    options: dict[str, Any] = field(default_factory=dict)
    default: bool = False
    restart: str = "on-failure"
    timeout: float | None = None  # seconds a call may take, callbacks included; past it the compartment is ended
    # Applied in the compartment's process before any component code runs (flexos/hardening.py).
    hardening: dict[str, Any] = field(default_factory=dict)
    max_reply: int = DEFAULT_MAX_REPLY  # bytes; a larger frame from it is refused (ReplyTooLarge)


@dataclass(frozen=True)
class Image:
    compartments: dict[str, CompartmentSpec]
    libraries: dict[str, str]  # module or package name -> compartment name
    source: str = "<flexos.yaml>"
    # Per-library hardening (the audit policy of events raised from that library's own frames).
    library_hardening: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def default(self) -> str:
        return next(name for name, spec in self.compartments.items() if spec.default)

    def compartment_of(self, module: str) -> str | None:
        """The compartment a module is placed in, or None if it is not listed (replicated).

        A package entry covers its submodules unless a submodule has its own entry: the longest
        listed prefix wins.
        """
        libraries = self.libraries
        name = module
        while True:
            owner = libraries.get(name)
            if owner is not None:
                return owner
            cut = name.rfind(".")
            if cut < 0:
                return None
            name = name[:cut]

    def is_replicated(self, module: str) -> bool:
        """Unlisted modules are loaded by every compartment that imports them (own copy each)."""
        return self.compartment_of(module) is None or module == "flexos" or module.startswith("flexos.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "libraries": dict(self.libraries),
            "library_hardening": dict(self.library_hardening),
            "compartments": [
                {
                    "name": s.name,
                    "driver": s.driver,
                    "options": s.options,
                    "default": s.default,
                    "restart": s.restart,
                    "timeout": s.timeout,
                    "hardening": s.hardening,
                    "max_reply": s.max_reply,
                }
                for s in self.compartments.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        compartments = {c["name"]: CompartmentSpec(**c) for c in data["compartments"]}
        return cls(
            compartments=compartments,
            libraries=dict(data["libraries"]),
            source=data["source"],
            library_hardening=dict(data.get("library_hardening", {})),
        )
