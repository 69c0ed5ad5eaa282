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

# What every compartment's interpreter runs on (the import system, codecs, the main thread, the
# os interface) and so flexos's runtime in it too: a gate cannot stand in for them.
EVERY_COMPARTMENT = frozenset(
    {
        "builtins", "sys", "os", "posix", "posixpath", "genericpath", "stat", "_stat", "io", "_io", "abc", "_abc",
        "codecs", "_codecs", "encodings", "importlib", "_imp", "_frozen_importlib", "_frozen_importlib_external",
        "zipimport", "marshal", "site", "_sitebuiltins", "types", "_collections_abc", "warnings", "_warnings",
        "threading", "_thread", "_weakref",
    }
)  # fmt: skip


def placement_refusal(module: str) -> str | None:
    """Why ``module`` can never be placed in a compartment (it would silently stay the app's), or None."""
    top = module.partition(".")[0]
    if top == "flexos":
        return f"library {module!r} cannot be placed: flexos itself runs in every compartment; remove this entry"
    if top == "__main__":
        return (
            "'__main__' cannot be placed: it is the app's own script, which runs in the default compartment; "
            "move the code to box into a module of its own and place that"
        )
    if top in EVERY_COMPARTMENT:
        return (
            f"library {module!r} cannot be placed: every compartment's interpreter (and flexos in it) runs on "
            f"its own {top!r}; remove this entry"
        )
    return None


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
    # The compartments whose modules this one may import (None: not declared; see Image.may_reach).
    reaches: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Image:
    compartments: dict[str, CompartmentSpec]
    libraries: dict[str, str]  # module or package name -> compartment name
    source: str = "<flexos.yaml>"
    # Per-library hardening (the audit policy of events raised from that library's own frames).
    library_hardening: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-library data-sharing strategy where the default is wrong: {"buffers": "view"}.
    library_sharing: dict[str, dict[str, str]] = field(default_factory=dict)
    # Where each hardening setting is written, for messages that name it: a key path
    # (``compartments.parsers.hardening.filesystem``, ``libraries.json.hardening.audit``) -> ``FILE:LINE``.
    origins: dict[str, str] = field(default_factory=dict)

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

    def may_reach(self, source: str, target: str) -> bool:
        """Compartment ``source`` may import the modules placed in ``target`` (the reach policy).

        The default compartment (the app) reaches all. Any other reaches what its ``reaches:``
        lists; undeclared, a hardened compartment reaches none and an unhardened one all (it runs
        unconfined as the app's user: refusing it a gate would confine nothing).
        """
        if source == target or source == self.default:
            return True
        spec = self.compartments[source]
        if spec.reaches is not None:
            return target in spec.reaches
        return not spec.hardening

    def reach_refusal(self, source: str, target: str, module: str | None = None) -> str | None:
        """Why ``source`` may not reach ``target`` (to import ``module``), with the fix; None if it may."""
        if self.may_reach(source, target):
            return None
        what = f" (to import {module!r}, placed there)" if module else ""
        if self.compartments[source].reaches is None:
            why = "it is hardened, and a hardened compartment reaches only what its reaches: list names"
        else:
            why = f"its reaches: list does not name {target!r}"
        return (
            f"compartment {source!r} may not reach compartment {target!r}{what}: {why}; "
            f"to allow it, add {target!r} to the reaches: list of compartment {source!r} in {self.source}"
        )

    def origin(self, key: str) -> str:
        """Where the setting at ``key`` (see ``origins``) is written: ``FILE:LINE``, else the file."""
        return self.origins.get(key, self.source)

    def buffer_sharing(self, compartment: str) -> str:
        """How large bytes-like values cross between the app and ``compartment``: ``copy`` (each
        side gets its own object) or ``view`` (a read-only view of an immutable shared buffer), as
        the libraries placed there declare (they must agree: flexos.config checks it)."""
        for module, sharing in self.library_sharing.items():
            if self.compartment_of(module) == compartment and "buffers" in sharing:
                return sharing["buffers"]
        return "copy"

    def is_replicated(self, module: str) -> bool:
        """Unlisted modules are loaded by every compartment that imports them (own copy each)."""
        return self.compartment_of(module) is None or module == "flexos" or module.startswith("flexos.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "libraries": dict(self.libraries),
            "library_hardening": dict(self.library_hardening),
            "library_sharing": dict(self.library_sharing),
            "origins": dict(self.origins),
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
                    "reaches": None if s.reaches is None else list(s.reaches),
                }
                for s in self.compartments.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        compartments = {
            c["name"]: CompartmentSpec(**{**c, "reaches": None if c.get("reaches") is None else tuple(c["reaches"])})
            for c in data["compartments"]
        }
        return cls(
            compartments=compartments,
            libraries=dict(data["libraries"]),
            source=data["source"],
            library_hardening=dict(data.get("library_hardening", {})),
            library_sharing=dict(data.get("library_sharing", {})),
            origins=dict(data.get("origins", {})),
        )
