"""The ``explore:`` section of a space file, and the configurations it spans.

A space file is a base flexos.yaml plus an ``explore:`` section naming the components that may
move, how many compartments they may use, which drivers back them, which hardening options to
toggle (per compartment and per library, as FlexOS toggles SFI per library), constraints, and the
benchmark. Problems are reported as ``FILE:LINE: message`` like flexos.yaml's own.

A configuration is a partition of the components into compartments, a driver per compartment
and the toggles that are on. Each is enumerated once: compartments are numbered in the order of
their first component, so no two labelings of one partition appear.
"""

from __future__ import annotations

import copy
import difflib
import functools
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from flexos.config import (
    Hardening,
    LibraryHardening,
    Source,
    StrictModel,
    is_module_name,
    parse_document,
    plain,
    read_source,
    validation_problems,
)
from flexos.drivers import driver_class, names
from flexos.errors import ConfigError
from flexos.explore.engines import EngineName

# The drivers a space may explore (every one flexos implements), weakest boundary first.
_EXPLORABLE = sorted((d for d in map(driver_class, names()) if d.implemented), key=lambda d: d.strength)
# Strength of the boundary each driver puts around its compartment (0 = same compartment).
STRENGTH = {d.name: d.strength for d in _EXPLORABLE}
# A configuration name writes each compartment's driver as one letter.
DRIVER_LETTERS = {d.name: d.letter for d in _EXPLORABLE}
# The drivers whose compartments can be hardened (flexos.config refuses hardening elsewhere).
HARDENABLE = tuple(d.name for d in _EXPLORABLE if d.hardenable)
# Compartments of a driver that draws no boundary (one that may be the default) are all the app's
# own code, so two of them are one.
_UNBOUNDED = frozenset(d.name for d in _EXPLORABLE if d.may_be_default)
# The app's own code, pinned in the base's default compartment; it counts as a component when
# the safety order asks how well two components are separated.
APP = "(app)"
# More configurations than this cannot be ordered and searched in reasonable time.
MAX_CONFIGURATIONS = 10_000

_WORD = r"^[A-Z][a-z]*$"  # shorts and toggle names: they are concatenated in configuration names


class _ComponentSpec(StrictModel):
    short: str | None = Field(None, pattern=_WORD)
    modules: list[str] | None = Field(None, min_length=1)


class _Toggles(StrictModel):
    compartment: dict[str, Hardening] = Field(default_factory=dict)
    library: dict[str, LibraryHardening] = Field(default_factory=dict)


class _Constraints(StrictModel):
    together: list[list[str]] = Field(default_factory=list)
    apart: list[list[str]] = Field(default_factory=list)


class _BenchmarkSpec(StrictModel):
    command: str = Field(min_length=1)
    repeats: int = Field(3, ge=1, le=1000)
    better: Literal["higher", "lower"] = "higher"
    statistic: Literal["median", "mean"] = "median"
    timeout: float = Field(600.0, gt=0, le=86400, allow_inf_nan=False)
    failures: Literal["stop", "record"] = "stop"


class _Explore(StrictModel):
    components: dict[str, _ComponentSpec | None] = Field(min_length=1)
    compartments: int = Field(ge=1, le=64)
    drivers: list[str] = Field(min_length=1)
    hardening: _Toggles = Field(default_factory=_Toggles)
    constraints: _Constraints = Field(default_factory=_Constraints)
    benchmark: _BenchmarkSpec
    engine: EngineName = "local"  # where runs happen (flexos.explore.engines)
    address: str | None = None  # the ray engine's cluster (none: a Ray of its own on this machine)


@dataclass(frozen=True)
class Component:
    name: str
    short: str
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Group:
    """One compartment of a configuration: the components it holds, its driver, its toggles."""

    components: tuple[str, ...]  # component names, in the order the space lists them
    driver: str
    hardening: frozenset[str] = frozenset()  # compartment toggles that are on


@dataclass(frozen=True)
class Configuration:
    name: str
    compartments: tuple[Group, ...]  # numbered c1, c2, ... in the order of their first component
    library_hardening: frozenset[tuple[str, str]] = frozenset()  # (component, library toggle) pairs on

    def compartment_of(self, component: str) -> int:
        """Index (0-based) of the compartment holding ``component``."""
        return next(i for i, c in enumerate(self.compartments) if component in c.components)


@dataclass(frozen=True)
class Benchmark:
    command: str
    repeats: int
    higher_is_better: bool
    statistic: str  # "median" or "mean"
    timeout: float
    record_failures: bool = False  # a failing command marks its configuration failed instead of stopping


@dataclass(frozen=True)
class Space:
    source: Path
    base: dict[str, Any]  # the space file without ``explore:``, as plain data
    components: tuple[Component, ...]
    max_compartments: int
    drivers: tuple[str, ...]
    compartment_toggles: dict[str, dict[str, Any]]  # toggle name -> compartment hardening it turns on
    library_toggles: dict[str, dict[str, Any]]  # toggle name -> library hardening it turns on
    together: tuple[tuple[str, ...], ...]
    apart: tuple[tuple[str, ...], ...]
    benchmark: Benchmark
    drivers_line: int  # where ``drivers:`` is written, for messages about drivers
    engine: str = "local"  # where runs happen, unless ``flexos explore --engine`` says otherwise
    address: str | None = None

    # -- names ----------------------------------------------------------------------------------
    @property
    def names_drivers(self) -> bool:
        """Whether configuration names need the per-compartment suffix (drivers, compartment toggles)."""
        return len(self.drivers) > 1 or bool(self.compartment_toggles)

    def name(self, compartments: tuple[Group, ...], library_hardening: frozenset[tuple[str, str]]) -> str:
        """``R1HN1S2L1`` (FlexOS's style), plus ``_`` and a driver letter and toggles per compartment when needed."""
        text = ""
        for component in self.components:
            index = next(i for i, c in enumerate(compartments) if component.name in c.components)
            toggles = "".join(t for t in self.library_toggles if (component.name, t) in library_hardening)
            text += f"{component.short}{index + 1}{toggles}"
        if self.names_drivers:
            text += "_" + "".join(
                DRIVER_LETTERS[c.driver] + "".join(t for t in self.compartment_toggles if t in c.hardening)
                for c in compartments
            )
        return text

    def name_pattern(self) -> str:
        """An example and a legend for messages about names."""
        legend = ", ".join(f"{c.short}={c.name}" for c in self.components)
        example = self.configurations()[0].name
        return f"names like {example} ({legend}; digit = compartment)"

    def canonical_name(self, name: str) -> str:
        """The enumerated name of the configuration ``name`` describes, under any numbering of compartments.

        FlexOS's poset names compartments freely (R2N2S1L1 is R1N1S2L2); raises ValueError if
        ``name`` cannot be read.
        """
        alternatives = "|".join(sorted(map(re.escape, self.library_toggles), key=len, reverse=True))
        toggles = f"((?:{alternatives})*)" if alternatives else "()"
        pattern = "".join(f"{re.escape(c.short)}(\\d+){toggles}" for c in self.components)
        if self.names_drivers:
            pattern += "_(.+)"
        match = re.fullmatch(pattern, name)
        if match is None:
            raise ValueError(f"cannot read {name!r}: expected {self.name_pattern()}")
        groups = match.groups()
        labels: dict[int, list[str]] = {}
        library_hardening = set()
        for i, component in enumerate(self.components):
            labels.setdefault(int(groups[2 * i]), []).append(component.name)
            for toggle in self.library_toggles:
                if toggle in groups[2 * i + 1]:
                    library_hardening.add((component.name, toggle))
        drivers: dict[int, tuple[str, frozenset[str]]] = {}
        if self.names_drivers:
            letters = "".join(DRIVER_LETTERS.values())
            alternatives = "|".join(sorted(map(re.escape, self.compartment_toggles), key=len, reverse=True))
            part = f"([{letters}])((?:{alternatives})*)" if alternatives else f"([{letters}])()"
            suffix = groups[-1]
            if not re.fullmatch(f"(?:{part})+", suffix):
                raise ValueError(
                    f"cannot read the compartments part {suffix!r} of {name!r}: expected {self.name_pattern()}"
                )
            letter_driver = {v: k for k, v in DRIVER_LETTERS.items()}
            found = re.findall(part, suffix)
            if sorted(labels) != list(range(1, len(found) + 1)):
                raise ValueError(f"{name!r} numbers its compartments {sorted(labels)} but describes {len(found)}")
            for label, (letter, on) in enumerate(found, 1):
                toggles_on = frozenset(t for t in self.compartment_toggles if t in on)
                drivers[label] = (letter_driver[letter], toggles_on)
        compartments = []
        for label in sorted(labels, key=lambda lab: min(self._index[n] for n in labels[lab])):
            driver, toggles_on = drivers.get(label, (self.drivers[0], frozenset()))
            compartments.append(Group(tuple(labels[label]), driver, toggles_on))
        return self.name(tuple(compartments), frozenset(library_hardening))

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c.name: i for i, c in enumerate(self.components)}

    # -- enumeration ------------------------------------------------------------------------------
    def configurations(self) -> list[Configuration]:
        """Every valid configuration, once each (raises ConfigError past MAX_CONFIGURATIONS)."""
        found = list(itertools.islice(self._enumerate(), MAX_CONFIGURATIONS + 1))
        if len(found) > MAX_CONFIGURATIONS:
            raise ConfigError(
                [
                    f"{self.source}: the space has more than {MAX_CONFIGURATIONS} configurations; keep components "
                    "together (constraints.together), allow fewer compartments or drivers, or toggle fewer options"
                ]
            )
        return found

    def _enumerate(self) -> Iterator[Configuration]:
        units = self._units()
        for labels in _restricted_growth(len(units), self.max_compartments):
            blocks: list[list[str]] = [[] for _ in range(max(labels) + 1)]
            for unit, label in zip(units, labels, strict=True):
                blocks[label].extend(unit)
            members = [tuple(sorted(b, key=self._index.__getitem__)) for b in blocks]
            if any(len(set(group) & set(block)) > 1 for group in self.apart for block in members):
                continue
            for drivers in itertools.product(self.drivers, repeat=len(members)):
                if sum(driver in _UNBOUNDED for driver in drivers) > 1:
                    continue
                yield from self._hardened(members, drivers)

    def _hardened(self, members: list[tuple[str, ...]], drivers: tuple[str, ...]) -> Iterator[Configuration]:
        compartment_choices: list[list[frozenset[str]]] = [
            _subsets(tuple(self.compartment_toggles)) if d in HARDENABLE else [frozenset()] for d in drivers
        ]
        libraries = [n for block, d in zip(members, drivers, strict=True) if d in HARDENABLE for n in block]
        libraries.sort(key=self._index.__getitem__)
        library_choices = [_subsets(tuple(self.library_toggles))] * len(libraries)
        for on_compartments in itertools.product(*compartment_choices):
            compartments = tuple(
                Group(block, driver, on) for block, driver, on in zip(members, drivers, on_compartments, strict=True)
            )
            for on_libraries in itertools.product(*library_choices):
                library_hardening = frozenset(
                    (library, toggle) for library, on in zip(libraries, on_libraries, strict=True) for toggle in on
                )
                yield Configuration(self.name(compartments, library_hardening), compartments, library_hardening)

    def _units(self) -> list[list[str]]:
        """Components that move together (``constraints.together``, transitively), in listed order."""
        unit_of = {c.name: {c.name} for c in self.components}
        for group in self.together:
            merged = set().union(*(unit_of[n] for n in group))
            for name in merged:
                unit_of[name] = merged
        units: list[list[str]] = []
        for component in self.components:
            unit = sorted(unit_of[component.name], key=self._index.__getitem__)
            if unit[0] == component.name:
                units.append(unit)
        return units

    # -- the generated flexos.yaml ------------------------------------------------------------------
    def flexos_document(self, config: Configuration) -> dict[str, Any]:
        """The flexos.yaml of ``config``: the base plus compartments c1, c2, ... holding the components."""
        document = copy.deepcopy(self.base)
        document["name"] = config.name
        libraries = document.setdefault("libraries", {})
        modules = {c.name: c.modules for c in self.components}
        for number, compartment in enumerate(config.compartments, 1):
            entry: dict[str, Any] = {"name": f"c{number}", "mechanism": {"driver": compartment.driver}}
            hardening = [self.compartment_toggles[t] for t in self.compartment_toggles if t in compartment.hardening]
            if hardening:
                entry["hardening"] = _merge(hardening)
            document["compartments"].append(entry)
            for component in compartment.components:
                toggles = [
                    self.library_toggles[t] for t in self.library_toggles if (component, t) in config.library_hardening
                ]
                for module in modules[component]:
                    libraries[module] = {"compartment": f"c{number}"}
                    if toggles:
                        libraries[module]["hardening"] = _merge(toggles)
        # A space explores what isolation costs, not which compartment may import from which: a
        # hardened compartment (which reaches none undeclared) reaches all the others, as before.
        names = [entry["name"] for entry in document["compartments"]]
        for entry in document["compartments"]:
            if entry.get("hardening") and "reaches" not in entry:
                entry["reaches"] = [name for name in names if name != entry["name"]]
        return document


def _restricted_growth(length: int, most: int) -> Iterator[tuple[int, ...]]:
    """Labelings of ``length`` items into at most ``most`` blocks, one per partition (a[0]=0, a[i] <= max(a[:i])+1)."""
    if length == 0:
        return
    labels = [0] * length

    def grow(position: int, highest: int) -> Iterator[tuple[int, ...]]:
        if position == length:
            yield tuple(labels)
            return
        for label in range(min(highest + 2, most)):
            labels[position] = label
            yield from grow(position + 1, max(highest, label))

    yield from grow(1, 0)


def _subsets(items: tuple[str, ...]) -> list[frozenset[str]]:
    return [frozenset(c) for size in range(len(items) + 1) for c in itertools.combinations(items, size)]


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several hardening mappings as one: mappings merge, lists join, other values must agree."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = copy.deepcopy(value)
            elif isinstance(value, dict) and isinstance(merged[key], dict):
                merged[key] = _merge([merged[key], value])
            elif isinstance(value, list) and isinstance(merged[key], list):
                merged[key] = merged[key] + [v for v in value if v not in merged[key]]
            elif merged[key] != value:
                raise ValueError(f"{key}: {merged[key]!r} and {value!r}")
    return merged


# -- loading ----------------------------------------------------------------------------------------
def load_space(path: str | Path) -> tuple[Space, list[str]]:
    """Read and validate a space file; return the space and the base's warnings, or raise ConfigError."""
    path = Path(path)
    src = read_source(path)
    if "explore" not in src.doc:
        raise ConfigError([f"{path}:1: no 'explore:' section; add one (see docs/explore.md)"])
    try:
        spec = _Explore.model_validate(plain(src.doc["explore"]))
    except ValidationError as exc:
        raise ConfigError(validation_problems(src, exc, _Explore, ("explore",))) from None

    base_src = read_source(path)
    del base_src.doc["explore"]
    _, notes = parse_document(base_src)
    base = plain(base_src.doc)

    problems: list[str] = []
    components = _components(src, spec, base, problems)
    names = [c.name for c in components]
    drivers = _drivers(src, spec, problems)
    compartment_names = {c["name"] for c in base["compartments"]}
    clashes = sorted(compartment_names & {f"c{i}" for i in range(1, spec.compartments + 1)})
    if clashes:
        problems.append(
            src.error(
                ("compartments",),
                f"the base declares {', '.join(clashes)}, which exploring names its own compartments; rename them",
            )
        )
    for kind in ("compartment", "library"):
        for toggle in getattr(spec.hardening, kind):
            if not re.match(_WORD, toggle):
                problems.append(
                    src.error(
                        ("explore", "hardening", kind, toggle),
                        f"toggle name {toggle!r}: use a capital letter then lower-case letters (H, Env, Seccomp); "
                        "names of configurations are written with it",
                    )
                )
    shorts = {c.short for c in components}
    for toggle in spec.hardening.library:
        if toggle in shorts:
            problems.append(
                src.error(
                    ("explore", "hardening", "library", toggle),
                    f"library toggle {toggle!r} is also a component's short name; rename one",
                )
            )
    if (spec.hardening.compartment or spec.hardening.library) and not set(HARDENABLE) & set(drivers):
        problems.append(
            src.error(
                ("explore", "hardening"),
                "hardening needs a compartment with its own process: add "
                f"{' or '.join(map(repr, HARDENABLE))} to explore.drivers",
            )
        )
    compartment_toggles = {t: h.model_dump(exclude_unset=True) for t, h in spec.hardening.compartment.items()}
    library_toggles = {t: h.model_dump(exclude_unset=True) for t, h in spec.hardening.library.items()}
    for kind, toggles in (("compartment", compartment_toggles), ("library", library_toggles)):
        try:
            _merge(list(toggles.values()))
        except ValueError as exc:
            problems.append(
                src.error(
                    ("explore", "hardening", kind),
                    f"two {kind} toggles set the same option differently ({exc}); one configuration may turn both on",
                )
            )
    together = _groups(src, spec.constraints.together, "together", names, problems)
    apart = _groups(src, spec.constraints.apart, "apart", names, problems)
    for group in apart:
        for other in together:
            both = set(group) & set(other)
            if len(both) > 1:
                problems.append(
                    src.error(
                        ("explore", "constraints"),
                        f"{' and '.join(sorted(both))} must be both together and apart; drop one constraint",
                    )
                )
    if problems:
        raise ConfigError(problems)
    space = Space(
        source=path,
        base=base,
        components=tuple(components),
        max_compartments=spec.compartments,
        drivers=tuple(drivers),
        compartment_toggles=compartment_toggles,
        library_toggles=library_toggles,
        together=together,
        apart=apart,
        benchmark=Benchmark(
            spec.benchmark.command,
            spec.benchmark.repeats,
            spec.benchmark.better == "higher",
            spec.benchmark.statistic,
            spec.benchmark.timeout,
            spec.benchmark.failures == "record",
        ),
        drivers_line=src.line(("explore", "drivers")),
        engine=spec.engine,
        address=spec.address,
    )
    if not space.configurations():
        raise ConfigError([src.error(("explore", "constraints"), "the constraints leave no configuration")])
    return space, notes


def _components(src: Source, spec: _Explore, base: dict[str, Any], problems: list[str]) -> list[Component]:
    listed = base.get("libraries") or {}
    owner: dict[str, str] = {}
    short_line: dict[str, tuple[str, int]] = {}
    components = []
    for name, entry in spec.components.items():
        loc = ("explore", "components", name)
        modules = tuple(entry.modules) if entry and entry.modules else (name,)
        for module in modules:
            if not is_module_name(module) or module == "flexos" or module.startswith("flexos."):
                problems.append(
                    src.error(loc, f"{module!r} is not a module that can move (dotted Python names, not flexos)")
                )
            elif module in listed:
                problems.append(
                    src.error(loc, f"{module!r} is placed by the base's libraries too; remove it from one of them")
                )
            elif module in owner:
                problems.append(src.error(loc, f"{module!r} belongs to component {owner[module]!r} already"))
            owner.setdefault(module, name)
        short = entry.short if entry and entry.short else name[:1].upper()
        if not re.match(_WORD, short):
            problems.append(src.error(loc, f"component {name!r} needs a short name: add e.g. 'short: Q'"))
        elif short in short_line:
            other, line = short_line[short]
            problems.append(
                src.error(
                    loc,
                    f"components {other!r} (line {line}) and {name!r} are both written {short!r} in "
                    "configuration names; give one of them another 'short:'",
                )
            )
        short_line.setdefault(short, (name, src.line(loc)))
        components.append(Component(name, short, modules))
    return components


def _drivers(src: Source, spec: _Explore, problems: list[str]) -> list[str]:
    drivers = []
    for index, driver in enumerate(spec.drivers):
        if driver not in STRENGTH:
            guess = difflib.get_close_matches(driver, list(STRENGTH), n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            problems.append(
                src.error(
                    ("explore", "drivers", index),
                    f"driver {driver!r} cannot be explored; {hint}(drivers: {', '.join(STRENGTH)})",
                )
            )
        elif driver in drivers:
            problems.append(src.error(("explore", "drivers", index), f"driver {driver!r} is listed twice"))
        else:
            drivers.append(driver)
    return sorted(drivers, key=STRENGTH.__getitem__)


def _groups(
    src: Source, groups: list[list[str]], kind: str, names: list[str], problems: list[str]
) -> tuple[tuple[str, ...], ...]:
    checked = []
    for index, group in enumerate(groups):
        loc = ("explore", "constraints", kind, index)
        unknown = [n for n in group if n not in names]
        for name in unknown:
            guess = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            problems.append(
                src.error(loc, f"{kind}: {name!r} is not a component; {hint}(components: {', '.join(names)})")
            )
        if len(set(group)) < 2:
            problems.append(src.error(loc, f"{kind}: a group needs at least two different components"))
        elif not unknown:
            checked.append(tuple(group))
    return tuple(checked)
