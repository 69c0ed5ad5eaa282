"""What a trace attributes to: units, the pieces of an app a flexos.yaml can place.

A unit is a third-party distribution's top-level package (``hiredis``, ``jinja2``), a module of
the app's own code at two levels (``kv.resp``, ``web.parser``, ``helpers``), the script run as
``__main__``, or one of the standard-library packages listed in :data:`STDLIB_COMPONENTS`, which
parse untrusted input or bind a C library (``sqlite3`` with its ``_sqlite3``). The rest of the
standard library is not a unit: like a statically linked libc in every FlexOS compartment, each
compartment imports its own copy, and what it does is done for the unit that called it.

Standard library only: the recorder runs this inside the traced app.
"""

from __future__ import annotations

import importlib.machinery
import site
import sys
import types
from typing import Any

from flexos.hardening import MACHINERY

# Standard-library packages a proposal may cut out, and the C modules that belong to each: they
# parse data an attacker may control, or bind a C library that does.
STDLIB_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sqlite3": ("_sqlite3",),
    "xml": ("pyexpat", "_elementtree"),
    "json": ("_json",),
    "csv": ("_csv",),
    "pickle": ("_pickle",),
    "zlib": (),
    "bz2": ("_bz2",),
    "lzma": ("_lzma",),
    "tarfile": (),
    "zipfile": (),
    "email": (),
    "html": (),
    "plistlib": (),
    "tomllib": (),
}
_STDLIB_OWNER = {c: public for public, privates in STDLIB_COMPONENTS.items() for c in (public, *privates)}
# Third-party packages known to parse untrusted input though they may be pure Python; with the
# C extensions, the first candidates for a compartment of their own.
KNOWN_PARSERS = frozenset(
    {
        "yaml", "ruamel", "tomli", "toml", "html5lib", "bs4", "lxml", "h11", "multipart", "python_multipart",
        "defusedxml", "xmltodict", "markdown", "mistune", "docutils", "pypdf", "PyPDF2", "pdfminer", "PIL",
        "httptools", "hiredis", "ujson", "orjson", "msgspec", "cbor2", "protobuf", "google",
    }
)  # fmt: skip
# Top-level names that count as component code where flexos.hardening.acting_frames walks the
# stack for a trace: the app's script, and the standard-library packages above.
MAIN = "__main__"
TRACE_COMPONENTS = frozenset({MAIN, *_STDLIB_OWNER})
APP, THIRD_PARTY, STDLIB = "app", "third-party", "stdlib"
_EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
_MODULE_TYPE = types.ModuleType


def _site_directories() -> tuple[str, ...]:
    found = [*site.getsitepackages(), site.getusersitepackages()]
    found += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    return tuple(dict.fromkeys(p.rstrip("/") + "/" for p in found if p))


class Units:
    """Module names to units, cached: asked on every monitored call, so each answer is one dict lookup."""

    def __init__(self) -> None:
        self._site = _site_directories()
        self._by_module: dict[str, str | None] = {}
        self._kind: dict[str, str] = {}
        self._stdlib = sys.stdlib_module_names

    def of_module(self, module: str | None) -> str | None:
        """The unit ``module`` belongs to; None for code no compartment holds on its own (most of
        the standard library, flexos itself, code without a module)."""
        try:
            return self._by_module[module]  # type: ignore[index]
        except KeyError:
            unit = self._by_module[module] = self._classify(module)  # type: ignore[index]
            return unit

    def kind(self, unit: str) -> str:
        """app, third-party or stdlib."""
        return self._kind.get(unit, APP)

    def _classify(self, module: str | None) -> str | None:
        if not module or module.startswith("__editable__"):  # an editable install's finder
            return None
        if module == MAIN:
            self._kind[MAIN] = APP
            return MAIN
        top = module.partition(".")[0]
        if top in MACHINERY:  # flexos's own code: never component code
            return None
        if module not in sys.modules:  # code made by exec with globals of its own (namedtuple's, a template's)
            return None
        if top in self._stdlib:
            owner = _STDLIB_OWNER.get(top)
            if owner is not None:
                self._kind[owner] = STDLIB
            return owner
        if self._is_third_party(top):
            self._kind[top] = THIRD_PARTY
            return top
        unit = ".".join(module.split(".")[:2])
        self._kind[unit] = APP
        return unit

    def _is_third_party(self, top: str) -> bool:
        where = _location(sys.modules.get(top))
        return where is not None and where.startswith(self._site)

    def of_callable(self, function: Any) -> str | None:
        """The unit of a C function, method or type (they have no frame to read a module from)."""
        owner = getattr(function, "__self__", None)
        if owner is None or isinstance(owner, type):
            objclass = getattr(function, "__objclass__", None)
            module = getattr(objclass if objclass is not None else function, "__module__", None)
        elif type(owner) is _MODULE_TYPE:
            module = owner.__name__
        else:
            module = type(owner).__module__
        return self.of_module(module) if type(module) is str else None


def _location(module: Any) -> str | None:
    if module is None:
        return None
    where = getattr(module, "__file__", None)
    if where is None:
        path = getattr(module, "__path__", None)
        where = next(iter(path), None) if path is not None else None
    return where


def is_extension(module: Any) -> bool:
    """Whether ``module`` is native code: a shared library, or compiled into the interpreter."""
    spec = getattr(module, "__spec__", None)
    origin = getattr(spec, "origin", None) or ""
    return origin == "built-in" or origin.endswith(_EXTENSION_SUFFIXES)


def library_entries(unit: str) -> tuple[str, ...]:
    """The ``libraries:`` names that place ``unit``: a standard-library package with its C modules."""
    return (unit, *STDLIB_COMPONENTS.get(unit, ()))
