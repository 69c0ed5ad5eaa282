"""The rules between entries of flexos.yaml, one small function each.

Each returns its problem as ``FILE:LINE: message`` naming the fix, or None. Rules about a
mechanism ask the driver class (its capabilities) and name the drivers that have what is needed,
so a new driver is covered without a change here.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

from flexos.config.schema import CompartmentEntry, LibraryEntry, did_you_mean, is_module_name
from flexos.config.source import Source, where
from flexos.drivers import driver_class, names
from flexos.drivers.base import Driver
from flexos.errors import DriverUnavailable
from flexos.hardening import locate
from flexos.image import CompartmentSpec, placement_refusal


def driver_named(name: Any) -> type[Driver] | None:
    """The driver class ``mechanism.driver`` names, or None if it names none."""
    try:
        return driver_class(name)
    except DriverUnavailable:
        return None


def _drivers_that(capability: str) -> str:
    """The drivers with ``capability``, as a message writes them: 'a', 'b' or 'c'."""
    quoted = [repr(name) for name in names() if getattr(driver_class(name), capability)]
    return " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]]))


# -- one compartment ------------------------------------------------------------------------------
def name_declared_twice(src: Source, index: int, entry: CompartmentEntry, first_line: dict[str, int]) -> str | None:
    if entry.name not in first_line:
        return None
    return src.error(
        ("compartments", index, "name"),
        f"compartment {entry.name!r} is declared twice (first on line {first_line[entry.name]}); "
        "give each compartment its own name",
    )


def unknown_driver(src: Source, index: int, entry: CompartmentEntry) -> str | None:
    loc = ("compartments", index, "mechanism")
    driver = entry.mechanism.get("driver")
    if driver is None:
        return src.error(loc, f"compartment {entry.name!r}: mechanism needs a 'driver' (one of: {', '.join(names())})")
    if driver_named(driver) is not None:
        return None
    hint = did_you_mean(str(driver), names())
    return src.error(loc + ("driver",), f"unknown driver {driver!r}{hint} (known drivers: {', '.join(names())})")


def hardening_needs_hardenable(src: Source, index: int, entry: CompartmentEntry, driver: type[Driver]) -> str | None:
    if entry.hardening is None or driver.hardenable:
        return None
    return src.error(
        ("compartments", index, "hardening"),
        f"compartment {entry.name!r}: hardening needs its own process (driver {_drivers_that('hardenable')}); "
        f"a {driver.name!r} compartment shares the app's",
    )


def timeout_needs_supports_timeout(
    src: Source, index: int, entry: CompartmentEntry, driver: type[Driver]
) -> str | None:
    if entry.timeout is None or driver.supports_timeout:
        return None
    return src.error(
        ("compartments", index, "timeout"),
        f"compartment {entry.name!r}: a timeout needs driver {_drivers_that('supports_timeout')} "
        f"(a stuck {driver.name!r} call runs on the caller's own thread)",
    )


# -- the default compartment ----------------------------------------------------------------------
def one_default(src: Source, entries: list[CompartmentEntry]) -> str | None:
    defaults = [i for i, entry in enumerate(entries) if entry.default]
    if not defaults:
        return src.error(
            ("compartments",), "no compartment has 'default: true'; mark exactly one (the app's own code runs there)"
        )
    if len(defaults) > 1:
        lines = ", ".join(str(src.line(("compartments", i, "default"))) for i in defaults)
        return src.error(
            ("compartments", defaults[1], "default"),
            f"{len(defaults)} compartments have 'default: true' (lines {lines}); keep exactly one",
        )
    return None


def default_may_hold_the_app(src: Source, entries: list[CompartmentEntry]) -> str | None:
    """The app's own code runs in the default compartment, which is the app's process and main
    interpreter whatever its driver: a driver that draws a boundary would silently not."""
    defaults = [i for i, entry in enumerate(entries) if entry.default]
    if len(defaults) != 1:
        return None
    entry = entries[defaults[0]]
    driver = driver_named(entry.mechanism.get("driver"))
    if driver is None or driver.may_be_default or not driver.implemented:  # refused at check and boot
        return None
    return src.error(
        ("compartments", defaults[0], "mechanism", "driver"),
        f"compartment {entry.name!r} is the default one, which is the app's own process; "
        f"give it driver {_drivers_that('may_be_default')} and isolate the other compartments",
    )


# -- reach ----------------------------------------------------------------------------------------
def reaches_declared(src: Source, index: int, entry: CompartmentEntry, declared: list[str]) -> list[str]:
    """Every name under ``reaches:`` is another declared compartment; the default one reaches all."""
    if entry.reaches is None:
        return []
    if entry.default:
        return [
            src.error(
                ("compartments", index, "reaches"),
                f"compartment {entry.name!r} is the default one (the app), which reaches every compartment; "
                "remove its reaches:",
            )
        ]
    found = []
    for position, name in enumerate(entry.reaches):
        loc = ("compartments", index, "reaches", position)
        if name == entry.name:
            found.append(src.error(loc, f"compartment {entry.name!r} always reaches itself; remove {name!r}"))
        elif name not in declared:
            guess = difflib.get_close_matches(name, declared, n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            found.append(
                src.error(
                    loc,
                    f"compartment {entry.name!r} reaches {name!r}, which is not declared; {hint}"
                    f"declared: {', '.join(declared)}",
                )
            )
    return found


# -- libraries ------------------------------------------------------------------------------------


def library_name(src: Source, module: str) -> str | None:
    if not is_module_name(module):
        return src.error(
            ("libraries", module),
            f"library {module!r} is not an importable module name "
            "(dotted Python identifiers, e.g. 'sqlite3' or 'myapp.parsers')",
        )
    refusal = placement_refusal(module)
    if refusal is not None:
        return src.error(("libraries", module), refusal)
    return None


def declared_compartment(src: Source, module: str, library: LibraryEntry, declared: list[str]) -> str | None:
    if library.compartment in declared:
        return None
    guess = difflib.get_close_matches(library.compartment, declared, n=1)
    hint = f"did you mean {guess[0]!r}? " if guess else ""
    return src.error(
        ("libraries", module, "compartment"),
        f"library {module!r} is placed in compartment {library.compartment!r}, which is not declared; "
        f"{hint}declared: {', '.join(declared)}",
    )


def library_hardening_needs_hardenable(
    src: Source, module: str, library: LibraryEntry, specs: dict[str, CompartmentSpec]
) -> str | None:
    owner = specs.get(library.compartment)  # None: its compartment has a problem of its own
    if library.hardening is None or owner is None or driver_class(owner.driver).hardenable:
        return None
    return src.error(
        ("libraries", module, "hardening"),
        f"library {module!r}: hardening needs a {_drivers_that('hardenable')} compartment; "
        f"{library.compartment!r} shares the app's process",
    )


def buffer_views_need_a_port(
    src: Source, module: str, library: LibraryEntry, specs: dict[str, CompartmentSpec]
) -> str | None:
    """``buffers: view`` is kept only where a driver lends sealed buffers (its bulk port): anywhere
    else the library would be handed what the driver does instead, which is not what was declared."""
    owner = specs.get(library.compartment)  # None: its compartment has a problem of its own
    if library.sharing is None or library.sharing.buffers != "view" or owner is None:
        return None
    driver = driver_class(owner.driver)
    if driver.buffer_views:
        return None
    return src.error(
        ("libraries", module, "sharing", "buffers"),
        f"library {module!r}: buffers: view needs a {_drivers_that('buffer_views')} compartment (its gates lend "
        f"large buffers as read-only views, not copies); {library.compartment!r} is a {driver.name!r} "
        f"compartment, whose gates {driver.large_buffers}; remove the key (buffers: copy is the default) or move "
        f"the library to a {_drivers_that('buffer_views')} compartment",
    )


def declared_buffers(library: LibraryEntry) -> str | None:
    """The ``buffers:`` strategy the entry writes, or None (it leaves it to its compartment)."""
    if library.sharing is None or "buffers" not in library.sharing.model_fields_set:
        return None
    return library.sharing.buffers


def buffer_strategies_agree(src: Source, libraries: dict[str, LibraryEntry]) -> list[str]:
    """A compartment has one bulk port, so one buffer strategy: its libraries may not declare two."""
    first: dict[str, str] = {}  # compartment -> the first library declaring a strategy there
    found = []
    for module, library in libraries.items():
        strategy = declared_buffers(library)
        if strategy is None:
            continue
        earlier = first.setdefault(library.compartment, module)
        theirs = declared_buffers(libraries[earlier])
        if theirs == strategy:
            continue
        found.append(
            src.error(
                ("libraries", module, "sharing", "buffers"),
                f"library {module!r} declares buffers: {strategy}, but library {earlier!r} "
                f"({_at(src, ('libraries', earlier, 'sharing', 'buffers'))}), in the same compartment "
                f"{library.compartment!r}, declares buffers: {theirs}; a compartment's gates have one strategy "
                "for all its libraries: make the two agree, or place one in a compartment of its own",
            )
        )
    return found


def _at(src: Source, loc: tuple[Any, ...]) -> str:
    """Where ``loc`` is, as a message names a second place: its line, or its key path (no file)."""
    line = src.line(loc)
    return f"line {line}" if line else where(loc)


# -- warnings -------------------------------------------------------------------------------------
def silent_libraries_in_view_compartments(src: Source, libraries: dict[str, LibraryEntry]) -> list[str]:
    """A library that declares no strategy gets its compartment's: views, if another declares them."""
    viewing: dict[str, str] = {}  # compartment -> the first library declaring views there
    for module, library in libraries.items():
        if declared_buffers(library) == "view":
            viewing.setdefault(library.compartment, module)
    return [
        src.error(
            ("libraries", module),
            f"warning: library {module!r} declares no sharing, but library {viewing[library.compartment]!r} in "
            f"the same compartment {library.compartment!r} declares buffers: view, so {module!r} gets read-only "
            f"memoryviews for large buffers too; add sharing: {{buffers: view}} to {module!r} to say so, "
            "or place it in another compartment",
        )
        for module, library in libraries.items()
        if declared_buffers(library) is None and library.compartment in viewing
    ]


def unused_compartments(src: Source, entries: list[CompartmentEntry], libraries: dict[str, str]) -> list[str]:
    used = set(libraries.values())
    return [
        src.error(
            ("compartments", index, "name"),
            f"warning: compartment {entry.name!r} is declared but no library is placed in it; "
            "place a library in it or remove it",
        )
        for index, entry in enumerate(entries)
        if not entry.default and entry.name not in used
    ]


# -- placement, where the app runs -----------------------------------------------------------------
def library_found(src: Source, module: str, search: list[str]) -> str | None:
    """A module placed in an isolated compartment exists where the app imports from (``search``):
    else the app would get ImportError at best, and the library it meant run unboxed at worst."""
    if locate(module, search) is not None:
        return None
    parent, _, _last = module.rpartition(".")
    if parent and locate(parent, search) is None:
        return library_found(src, parent, search)
    hint = _import_name_of_distribution(module) or _close_module(module, search)
    where = f"package {parent!r}" if parent else "the app's path"
    return src.error(
        ("libraries", module),
        f"library {module!r} is not a module found in {where} ({', '.join(search[:2])}, ...){hint}; "
        "libraries: keys are import names",
    )


def _import_name_of_distribution(name: str) -> str:
    """``pillow`` -> "; did you mean 'PIL' (the import name of the distribution 'pillow')?"."""
    import importlib.metadata

    def normal(text: str) -> str:
        return text.lower().replace("-", "_").replace(".", "_")

    found = importlib.metadata.packages_distributions()
    for import_name, distributions in sorted(found.items(), key=lambda item: item[0].startswith("_")):
        for distribution in distributions:
            if normal(distribution) == normal(name) and normal(import_name) != normal(name):
                return f"; did you mean {import_name!r} (the import name of the distribution {distribution!r})?"
    return ""


def _close_module(module: str, search: list[str]) -> str:
    import pkgutil

    parent, _, last = module.rpartition(".")
    if parent:
        spec = locate(parent, search)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        known = [info.name for info in pkgutil.iter_modules(locations)]
    else:
        known = [info.name for info in pkgutil.iter_modules(search)] + list(sys.builtin_module_names)
    guess = difflib.get_close_matches(last, known, n=1) or [k for k in known if k.lower() == last.lower()][:1]
    return f"; did you mean {'.'.join(filter(None, [parent, guess[0]]))!r}?" if guess else ""
