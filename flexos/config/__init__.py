"""Load and validate flexos.yaml into an :class:`~flexos.image.Image`.

Every problem is reported with the file, the line, and what to change: :mod:`.source` reads the
YAML keeping each key's line, :mod:`.schema` checks structure and types (pydantic; a driver's
options come from the driver's own declaration), :mod:`.rules` the rules between entries (one
default, declared compartments, what each driver can do).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from pydantic import ValidationError

from flexos.config import rules
from flexos.config.schema import (
    Hardening,
    LibraryHardening,
    StrictModel,
    is_module_name,
    mechanism_model,
    parse_size,
    validate,
    validation_problems,
)
from flexos.config.source import Source, plain, read_source
from flexos.drivers import driver_class
from flexos.errors import ConfigError
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image

__all__ = [
    "ConfigWarning",
    "Hardening",
    "LibraryHardening",
    "Source",
    "StrictModel",
    "is_module_name",
    "load",
    "parse",
    "parse_document",
    "parse_size",
    "plain",
    "read_source",
    "validation_problems",
]


class ConfigWarning(UserWarning):
    """A flexos.yaml that works but is probably not what its author meant."""


def parse(path: str | Path) -> tuple[Image, list[str]]:
    """Validate ``path``; return the image and the warnings, or raise ConfigError listing every problem."""
    return parse_document(read_source(Path(path)))


def parse_document(src: Source) -> tuple[Image, list[str]]:
    """Validate a document already read (the base of an explore space is one without its ``explore:``)."""
    config = validate(src)
    problems: list[str] = []
    specs = _compartments(src, config.compartments, problems)
    problem = rules.one_default(src, config.compartments) or rules.default_may_hold_the_app(src, config.compartments)
    if problem:
        problems.append(problem)
    libraries: dict[str, str] = {}
    library_hardening: dict[str, dict] = {}
    declared = list(dict.fromkeys(entry.name for entry in config.compartments))
    for index, entry in enumerate(config.compartments):
        problems.extend(rules.reaches_declared(src, index, entry, declared))
    for module, library in config.libraries.items():
        problem = (
            rules.library_name(src, module)
            or rules.declared_compartment(src, module, library, declared)
            or rules.library_hardening_needs_hardenable(src, module, library, specs)
        )
        if problem:
            problems.append(problem)
            continue
        if library.hardening is not None:
            library_hardening[module] = library.hardening.model_dump()
        libraries[module] = library.compartment
    if problems:
        raise ConfigError(problems)
    notes = rules.unused_compartments(src, config.compartments, libraries)
    return Image(specs, libraries, source=src.path, library_hardening=library_hardening), notes


def _compartments(src: Source, entries: list, problems: list[str]) -> dict[str, CompartmentSpec]:
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
            options = model.model_validate(dict(entry.mechanism)).model_dump(exclude={"driver"})
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
            entry.name, driver.name, options, entry.default, entry.restart, entry.timeout, hardening, reaches=reaches
        )
    return specs


def load(path: str | Path = DEFAULT_CONFIG) -> Image:
    """Load a flexos.yaml; problems raise ConfigError, suspicious parts emit a ConfigWarning."""
    image, notes = parse(path)
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return image
