"""What flexos.yaml can say, as pydantic models, and pydantic's errors as ``FILE:LINE`` problems.

Structure and types are checked here; the rules between entries are :mod:`flexos.config.rules`.
A driver's ``mechanism:`` options are declared once, by the driver (a stdlib dataclass, see
:mod:`flexos.drivers.base`); :func:`mechanism_model` builds their pydantic model from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
)

from flexos.config.audit import deniable
from flexos.config.source import Source, plain, where
from flexos.drivers.base import Driver, option_types
from flexos.errors import ConfigError
from flexos.hardening import AUDIT_ALIASES
from flexos.image import DEFAULT_MAX_REPLY

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"  # a compartment's name
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_module_name(name: str) -> bool:
    """A dotted Python name (``sqlite3``, ``myapp.parsers``), as a library entry must be."""
    return _MODULE.match(name) is not None


class StrictModel(BaseModel):
    """No unknown keys, no coercion (``"5"`` is not a number, ``1`` is not ``true``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|TiB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_AMBIGUOUS = re.compile(r"^(\d+)\s*([kKmMgGtT])[bB]?$")


def parse_size(text: str | int) -> int:
    """``512MiB`` -> bytes; a bare int is bytes. ``512MB`` is refused: half of the tools read it as
    10**6 bytes, half as 2**20."""
    if isinstance(text, int):
        return text
    ambiguous = _AMBIGUOUS.match(text.strip())
    if ambiguous is not None:
        number, unit = ambiguous.groups()
        binary = f"{number}{unit.upper() if unit != 'k' else 'K'}iB"
        raise ValueError(f"{text!r} is ambiguous: write {binary} (binary units) or a number of bytes")
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (write e.g. 512MiB, 2GiB or a number of bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def human_size(size: int) -> str:
    """bytes -> the largest binary unit that writes it exactly (``536870912`` -> ``512MiB``)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def did_you_mean(name: str, known: list[str]) -> str:
    """'; did you mean X?' for the known name closest to ``name`` (by spelling, else by case), or ''."""
    guess = difflib.get_close_matches(name, known, n=1) or [k for k in known if k.lower() == name.lower()][:1]
    return f"; did you mean {guess[0]!r}?" if guess else ""


# -- hardening ------------------------------------------------------------------------------------
class Limits(StrictModel):
    memory: int | str | None = None
    cpu_seconds: int | None = Field(None, gt=0)
    open_files: int | None = Field(None, ge=16, le=1 << 20)
    processes: int | None = None

    @field_validator("processes")
    @classmethod
    def _processes(cls, value: int | None) -> int | None:
        if value not in (None, 0):
            raise ValueError(
                "only 0 can be enforced for one compartment (Linux counts processes per user): "
                "0 forbids creating processes"
            )
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        size = parse_size(value)
        if size < 64 << 20:
            raise ValueError("below 64MiB a Python interpreter cannot start")
        return size


class Audit(StrictModel):
    deny: list[str] = Field(default_factory=list)

    @field_validator("deny")
    @classmethod
    def _events(cls, events: list[str]) -> list[str]:
        known = _deniable_events()
        for event in events:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_./]*$", event):
                raise ValueError(f"{event!r} is not an audit event name (e.g. subprocess, socket.connect, ctypes)")
            if event not in known:
                raise ValueError(
                    f"{event!r} is not an audit event CPython raises, a prefix of some (socket: socket.*), "
                    f"nor one of flexos's names ({', '.join(AUDIT_ALIASES)}){did_you_mean(event, known)}"
                )
        return events


@functools.cache
def _deniable_events() -> list[str]:
    return deniable(AUDIT_ALIASES)


class Filesystem(StrictModel):
    """Paths that exist now, absolute: ``~`` expanded, relative ones taken from flexos.yaml's
    directory (the validation context's ``base``), whichever mechanism enforces them."""

    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)

    @field_validator("read", "write")
    @classmethod
    def _existing(cls, paths: list[str], info: ValidationInfo) -> list[str]:
        context = info.context or {}
        if not context.get("here"):  # not to run here (a proposal, a space's base): kept as written
            return paths
        base = Path(context.get("base") or os.getcwd())
        resolved, missing = [], []
        for written in paths:
            path = Path(os.path.expanduser(written))
            if not path.is_absolute():
                path = base / path
            path = Path(os.path.normpath(path))
            if not path.exists():
                relative = "" if Path(os.path.expanduser(written)).is_absolute() else f", relative to {base}"
                missing.append(f"{written!r} does not exist ({path}{relative})")
            resolved.append(str(path))
        if missing:
            raise ValueError(
                f"{'; '.join(missing)}: only paths that exist when the compartment starts can be granted; "
                f"create {'it' if len(missing) == 1 else 'them'} first"
            )
        return resolved


_SYSCALL = re.compile(r"^[a-z_][a-z0-9_]*$")


class Seccomp(StrictModel):
    profile: Literal["compute-only"] | None = None
    deny: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)

    @field_validator("deny", "allow")
    @classmethod
    def _syscalls(cls, names: list[str]) -> list[str]:
        known = _system_calls()
        for name in names:
            if not _SYSCALL.match(name):
                raise ValueError(f"{name!r} is not a system call name (e.g. execve, socket, ptrace)")
            if known is not None and name not in known:
                raise ValueError(
                    f"{name!r} is not a system call on this machine (libseccomp){did_you_mean(name, known)}"
                )
        return names


@functools.cache
def _system_calls() -> list[str] | None:
    """The names libseccomp knows for this machine's native ABI (None: no libseccomp here, which
    ``flexos check`` reports for every compartment that asks for seccomp)."""
    try:
        import pyseccomp
    except (ImportError, OSError):
        return None
    arch = pyseccomp.system_arch()
    names = []
    for number in range(1024):
        try:
            names.append(pyseccomp.resolve_syscall(arch, number).decode())
        except ValueError:
            continue
    return names


class KeptEnvironment(StrictModel):
    """``env: {keep: [TZ, HOME]}``: a clean environment that keeps these of the app's variables."""

    keep: list[str] = Field(min_length=1)

    @field_validator("keep")
    @classmethod
    def _names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return names


class Hardening(StrictModel):
    """A compartment's ``hardening:`` (enforced in its own process, flexos/hardening.py)."""

    env: Literal["inherit", "clean"] | KeptEnvironment = "inherit"
    network: Literal["allow", "none"] = "allow"
    filesystem: Filesystem | None = None
    seccomp: Seccomp | None = None  # a profile name, or {profile, deny, allow}

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        """One message for the three forms (pydantic would give one per member of the union)."""
        if value in ("inherit", "clean"):
            return value
        if isinstance(value, dict):
            unknown = [key for key in value if key != "keep"]
            if unknown:
                hint = did_you_mean(str(unknown[0]), ["keep"])
                raise ValueError(f"unknown key {unknown[0]!r} in env{hint} (allowed: keep)")
            keep = value.get("keep")
            if not isinstance(keep, list) or not keep or not all(isinstance(name, str) for name in keep):
                raise ValueError(f"env: {{keep: ...}} takes a list of variable names (keep: [TZ, HOME]), not {keep!r}")
            for name in keep:
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                    raise ValueError(f"{name!r} is not an environment variable name")
            return value
        hint = did_you_mean(value, ["inherit", "clean"]) if isinstance(value, str) else ""
        raise ValueError(f"env is 'inherit', 'clean' or {{keep: [NAME, ...]}}, not {value!r}{hint}")

    @field_validator("seccomp", mode="before")
    @classmethod
    def _seccomp(cls, value: Any) -> Any:
        return {"profile": value} if isinstance(value, str) else value

    limits: Limits = Field(default_factory=Limits)
    audit: Audit = Field(default_factory=Audit)


class LibraryHardening(StrictModel):
    """What can be enforced for one library inside a shared process: its audit policy."""

    audit: Audit


# -- the file -------------------------------------------------------------------------------------
class CompartmentEntry(StrictModel):
    name: str = Field(pattern=NAME)
    mechanism: dict[str, Any]  # validated by the driver's model (mechanism_model) once the driver is known
    default: bool = False
    restart: Literal["on-failure", "never"] = "on-failure"
    timeout: float | None = Field(None, gt=0, le=86400, allow_inf_nan=False)
    hardening: Hardening | None = None
    max_reply: int | str = DEFAULT_MAX_REPLY

    @field_validator("max_reply")
    @classmethod
    def _max_reply(cls, value: int | str) -> int:
        size = parse_size(value)
        if size < 1 << 20:
            raise ValueError("below 1MiB ordinary replies (a module's names, a class description) may not fit")
        return size

    reaches: list[str] | None = None  # compartment names (flexos.config.rules.reaches_declared)


class LibrarySharing(StrictModel):
    """How a library's data crosses its compartment's gates where the default is wrong (FlexOS's
    shared heap / DSS / whitelists): ``buffers: view`` hands large bytes-like values over as
    read-only views instead of copies of the receiver's own (flexos.config.rules says where)."""

    buffers: Literal["copy", "view"] = "copy"


class LibraryEntry(StrictModel):
    compartment: str
    hardening: LibraryHardening | None = None
    sharing: LibrarySharing | None = None


class ConfigFile(StrictModel):
    name: str | None = None
    compartments: list[CompartmentEntry] = Field(min_length=1)
    libraries: dict[str, LibraryEntry] = Field(default_factory=dict)


# -- mechanism options, from the driver's dataclass -----------------------------------------------
@functools.cache
def mechanism_model(driver: type[Driver]) -> type[StrictModel]:
    """The model of ``mechanism: {driver: NAME, ...}`` for ``driver``: its ``Options``, validated."""
    named: Any = Literal[driver.name]  # a literal made at run time, one per driver
    return create_model(
        f"{driver.__name__}Mechanism",
        __base__=StrictModel,
        driver=(named, ...),
        **_option_fields(driver.Options),
    )


@functools.cache
def _options_model(options: type) -> type[StrictModel]:
    """A nested options dataclass (vm's ``filesystem``) as a model of its own."""
    return create_model(options.__name__, __base__=StrictModel, **_option_fields(options))


def _option_fields(options: type) -> dict[str, Any]:
    """(annotation, Field) per dataclass field: its default, bounds, sizes and nested mappings."""
    types = option_types(options)
    fields = {}
    for spec in dataclasses.fields(options):
        annotation, factory = types[spec.name], spec.default_factory
        limits = dict(spec.metadata)
        if spec.name == "filesystem" and isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            annotation = factory = Filesystem  # host paths a driver grants: one rule whichever driver
        elif isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            annotation = factory = _options_model(annotation)
        if "size" in limits:
            annotation = Annotated[int | str, AfterValidator(_size_at_least(*limits.pop("size")))]
        if annotation is float:
            limits["allow_inf_nan"] = False  # a timeout of .inf cannot be waited for
        if factory is dataclasses.MISSING:
            fields[spec.name] = (annotation, Field(spec.default, **limits))
        else:
            fields[spec.name] = (annotation, Field(default_factory=factory, **limits))
    return fields


def _size_at_least(minimum: int, why: str) -> typing.Callable[[int | str], int]:
    def size(value: int | str) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(why)
        return size

    return size


def context(src: Source, here: bool = False) -> dict[str, Any]:
    """What validators need beyond the document: the directory relative paths are taken from, and
    whether the image is to run on this machine (``here``: host paths must exist, and are resolved)."""
    return {"base": str(src.base), "here": here}


def validate(src: Source, here: bool = False) -> ConfigFile:
    """The whole file's structure and types; ConfigError listing every problem."""
    try:
        return ConfigFile.model_validate(plain(src.doc), context=context(src, here))
    except ValidationError as exc:
        raise ConfigError(validation_problems(src, exc, ConfigFile)) from None


# -- pydantic's errors as FILE:LINE problems ----------------------------------------------------------
_HINTS = {
    "bool_type": "use true or false",
    "int_type": "use a whole number",
    "float_type": "use a number",
    "string_type": "use a string",
    "list_type": "use a YAML list (lines starting with '- ')",
    "dict_type": "use a YAML mapping (key: value)",
    "model_type": "use a YAML mapping (key: value)",
    "literal_error": "",
    "string_pattern_mismatch": "names use letters, digits, '_' and '-', and start with a letter or '_'",
}


def validation_problems(
    src: Source, exc: ValidationError, model: type[BaseModel], prefix: tuple[Any, ...] = ()
) -> list[str]:
    """``exc`` (from validating the part of ``src`` at ``prefix`` with ``model``) as problems."""
    problems = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            key = loc[-1]
            owner = _model_at(model, tuple(err["loc"][:-1]))
            allowed = list(owner.model_fields) if owner is not None else []
            guess = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            owner_at = where(loc[:-1]) or "the top level"
            problems.append(src.error(loc, f"unknown key {key!r} in {owner_at}{hint} (allowed: {', '.join(allowed)})"))
        elif kind == "missing":
            problems.append(
                src.error(loc[:-1], f"{where(loc[:-1]) or 'the top level'} is missing the required key {loc[-1]!r}")
            )
        elif kind == "literal_error" and isinstance(err.get("input"), str):
            allowed = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
            hint = did_you_mean(err["input"], allowed)
            problems.append(src.error(loc, f"{where(loc)}: {err['msg']}{hint}"))
        else:
            hint = _HINTS.get(kind, "")
            message = re.sub(r" or instance of \w+$", "", err["msg"])  # pydantic's class names are not the file's
            if (
                kind == "model_type"
                and loc[:1] == ("libraries",)
                and len(loc) == 2
                and isinstance(err.get("input"), str)
            ):
                hint = f"write {loc[1]}: {{compartment: {err['input']}}}"
            problems.append(src.error(loc, f"{where(loc)}: {message}" + (f" ({hint})" if hint else "")))
    return problems


def _model_at(model: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that validates the mapping at ``path`` under ``model`` (None: not a model)."""
    annotation: Any = model
    for key in path:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(key)
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, dict):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``."""
    arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, type(int | None)) and len(arguments) == 1:
        return arguments[0]
    return annotation
