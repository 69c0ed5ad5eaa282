"""Load and validate flexos.yaml into an :class:`~flexos.image.Image`.

Every problem is reported with the file, the line, and what to change: :mod:`.source` reads the
YAML keeping each key's line, :mod:`.schema` checks structure and types (pydantic; a driver's
options come from the driver's own declaration), :mod:`.rules` the rules between entries (one
default, declared compartments, what each driver can do).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flexos.config import rules
from flexos.config.schema import (
    Hardening,
    LibraryEntry,
    LibraryHardening,
    StrictModel,
    context,
    human_size,
    is_module_name,
    mechanism_model,
    parse_size,
    validate,
    validation_problems,
)
from flexos.config.source import MappingSource, Source, plain, read_source
from flexos.drivers import driver_class
from flexos.errors import ConfigError
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image

__all__ = [
    "ConfigWarning",
    "Hardening",
    "LibraryHardening",
    "Source",
    "StrictModel",
    "app_path",
    "human_size",
    "is_module_name",
    "load",
    "load_mapping",
    "parse",
    "parse_document",
    "parse_size",
    "plain",
    "read_source",
    "validation_problems",
]


class ConfigWarning(UserWarning):
    """A flexos.yaml that works but is probably not what its author meant."""


def parse(path: str | Path, search: list[str] | None = None) -> tuple[Image, list[str]]:
    """Validate ``path``; return the image and the warnings, or raise ConfigError listing every problem.

    ``search``: where the app will import from, to run it here: each module placed in an isolated
    compartment must be found there, and host paths must exist (resolved: ``~`` expanded, relative
    ones taken from the file's directory). None: neither is verified and paths stay as written
    (a proposal of modules and paths seen elsewhere, an explore space's base).
    """
    return parse_document(read_source(Path(path)), search)


def app_path(config: str | Path, app_dir: str | Path | None = None) -> list[str]:
    """Where an app run with ``config`` imports from: its own directory (the script's; unknown: the
    working directory and the config's), then this interpreter's path (without the directory of the
    ``flexos`` command itself, which is not the app's)."""
    first = [str(app_dir)] if app_dir is not None else [os.getcwd(), str(Path(config).resolve().parent)]
    return list(dict.fromkeys(entry or os.getcwd() for entry in [*first, *_interpreter_path()]))


def _interpreter_path() -> list[str]:
    """``sys.path``, less its first entry when that is the directory of a console script
    (``.venv/bin`` under the ``flexos`` command): the app, run by python, will not have it."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if (
        sys.path
        and script is not None
        and script.name == "flexos"
        and sys.path[0]
        and Path(sys.path[0]).resolve() == script.resolve().parent
    ):
        return sys.path[1:]
    return list(sys.path)


def parse_document(src: Source, search: list[str] | None = None) -> tuple[Image, list[str]]:
    """Validate a document already read (the base of an explore space is one without its ``explore:``)."""
    config = validate(src, here=search is not None)
    problems: list[str] = []
    specs = _compartments(src, config.compartments, problems, here=search is not None)
    problem = rules.one_default(src, config.compartments) or rules.default_may_hold_the_app(src, config.compartments)
    if problem:
        problems.append(problem)
    libraries: dict[str, str] = {}
    library_hardening: dict[str, dict] = {}
    library_sharing: dict[str, dict[str, str]] = {}
    placed: dict[str, LibraryEntry] = {}  # the entries without problems
    declared = list(dict.fromkeys(entry.name for entry in config.compartments))
    isolated = {entry.name for entry in config.compartments if not entry.default}
    for index, entry in enumerate(config.compartments):
        problems.extend(rules.reaches_declared(src, index, entry, declared))
    for module, library in config.libraries.items():
        problem = (
            rules.library_name(src, module)
            or rules.declared_compartment(src, module, library, declared)
            or rules.library_hardening_needs_hardenable(src, module, library, specs)
            or rules.buffer_views_need_a_port(src, module, library, specs)
            or (
                rules.library_found(src, module, search)
                if search is not None and library.compartment in isolated
                else None
            )
        )
        if problem:
            problems.append(problem)
            continue
        if library.hardening is not None:
            library_hardening[module] = library.hardening.model_dump()
        if library.sharing is not None and library.sharing.model_fields_set:
            library_sharing[module] = library.sharing.model_dump(exclude_unset=True)
        libraries[module] = library.compartment
        placed[module] = library
    problems.extend(rules.buffer_strategies_agree(src, placed))
    if problems:
        raise ConfigError(problems)
    notes = rules.unused_compartments(src, config.compartments, libraries)
    notes += rules.silent_libraries_in_view_compartments(src, placed)
    image = Image(
        specs,
        libraries,
        source=src.path,
        library_hardening=library_hardening,
        library_sharing=library_sharing,
        origins=_origins(src, config.compartments, library_hardening),
    )
    return image, notes


# The hardening settings a denial can be explained by, each a key path under ``hardening:``.
_EXPLAINED = (("filesystem",), ("seccomp",), ("network",), ("limits", "memory"), ("limits", "processes"), ("audit",))


def _origins(src: Source, entries: list, library_hardening: dict[str, dict]) -> dict[str, str]:
    """Where each hardening setting is written (``FILE:LINE``), for the notes and messages of denials."""
    origins = {}
    for index, entry in enumerate(entries):
        if entry.hardening is None:
            continue
        for setting in _EXPLAINED:
            loc = ("compartments", index, "hardening", *setting)
            origins[".".join(("compartments", entry.name, "hardening", *setting))] = src.at(loc)
    for module in library_hardening:
        origins[f"libraries.{module}.hardening.audit"] = src.at(("libraries", module, "hardening", "audit"))
    return origins


def _compartments(src: Source, entries: list, problems: list[str], here: bool) -> dict[str, CompartmentSpec]:
    """The specs of the compartments without problems; the problems of the others go to ``problems``."""
    specs: dict[str, CompartmentSpec] = {}
    first_line: dict[str, int] = {}
    for index, entry in enumerate(entries):
        problem = rules.name_declared_twice(src, index, entry, first_line)
        if problem:
            problems.append(problem)
            continue
        first_line[entry.name] = src.line(("compartments", index, "name"))
        problem = rules.unknown_driver(src, index, entry)
        if problem:
            problems.append(problem)
            continue
        driver = driver_class(entry.mechanism["driver"])  # known: unknown_driver passed
        model = mechanism_model(driver)
        try:
            validated = model.model_validate(dict(entry.mechanism), context=context(src, here))
            options = validated.model_dump(exclude={"driver"})
        except ValidationError as exc:
            problems.extend(validation_problems(src, exc, model, ("compartments", index, "mechanism")))
            continue
        problem = rules.hardening_needs_hardenable(src, index, entry, driver) or rules.timeout_needs_supports_timeout(
            src, index, entry, driver
        )
        if problem:
            problems.append(problem)
            continue
        hardening = entry.hardening.model_dump() if entry.hardening else {}
        reaches = tuple(entry.reaches) if entry.reaches is not None else None
        specs[entry.name] = CompartmentSpec(
            entry.name,
            driver.name,
            options,
            entry.default,
            entry.restart,
            entry.timeout,
            hardening,
            reaches=reaches,
            max_reply=int(entry.max_reply),
        )
    return specs


def load_mapping(data: dict[str, Any], search: list[str] | None = None) -> Image:
    """An image from Python data of flexos.yaml's shape (``flexos.boot({...})``), validated as a file
    is, with the same messages naming key paths instead of lines; relative paths are the working
    directory's."""
    image, notes = parse_document(
        MappingSource("flexos.boot({...})", data), app_path(".", os.getcwd()) if search is None else search
    )
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=3)
    return image


def load(path: str | Path = DEFAULT_CONFIG, search: list[str] | None = None) -> Image:
    """Load a flexos.yaml; problems raise ConfigError, suspicious parts emit a ConfigWarning.
    Placement is verified on ``search`` (default: :func:`app_path`)."""
    image, notes = parse(path, app_path(path) if search is None else search)
    for note in notes:
        _warn_at_line(note)
    return image


def _warn_at_line(note: str) -> None:
    """Warn ``FILE:LINE: ...`` as coming from that line of flexos.yaml, not from flexos's source."""
    filename, line, _ = note.split(":", 2)
    warnings.warn_explicit(note, ConfigWarning, filename, int(line) if line.isdigit() else 0)
