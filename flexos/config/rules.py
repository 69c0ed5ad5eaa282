"""The rules between entries of flexos.yaml, one small function each.

Each returns its problem as ``FILE:LINE: message`` naming the fix, or None. Rules about a
mechanism ask the driver class (its capabilities) and name the drivers that have what is needed,
so a new driver is covered without a change here.
"""

from __future__ import annotations

import difflib
from typing import Any

from flexos.config.schema import CompartmentEntry, LibraryEntry, is_module_name
from flexos.config.source import Source
from flexos.drivers import driver_class, names
from flexos.drivers.base import Driver
from flexos.errors import DriverUnavailable
from flexos.image import CompartmentSpec


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
    guess = difflib.get_close_matches(str(driver), names(), n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
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
    if module == "flexos" or module.startswith("flexos."):
        return src.error(
            ("libraries", module),
            f"library {module!r} cannot be placed: flexos itself runs in every compartment; remove this entry",
        )
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


# -- warnings -------------------------------------------------------------------------------------
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
