"""What flexos.yaml can say, as pydantic models, and pydantic's errors as ``FILE:LINE`` problems.

Structure and types are checked here; the rules between entries are :mod:`flexos.config.rules`.
A driver's ``mechanism:`` options are declared once, by the driver (a stdlib dataclass, see
:mod:`flexos.drivers.base`); :func:`mechanism_model` builds their pydantic model from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from flexos.config.source import Source, plain
from flexos.drivers.base import Driver, option_types
from flexos.errors import ConfigError
from flexos.image import DEFAULT_MAX_REPLY

NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"  # a compartment's name
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_module_name(name: str) -> bool:
    """A dotted Python name (``sqlite3``, ``myapp.parsers``), as a library entry must be."""
    return _MODULE.match(name) is not None


class StrictModel(BaseModel):
    """No unknown keys, no coercion (``"5"`` is not a number, ``1`` is not ``true``)."""

    model_config = ConfigDict(extra="forbid", strict=True)


_SIZE = re.compile(r"^(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_size(text: str | int) -> int:
    """``512MiB`` -> bytes; a bare int is bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a size (write e.g. 512MiB, 2GiB or a number of bytes)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


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
        for event in events:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", event):
                raise ValueError(f"{event!r} is not an audit event name (e.g. subprocess, socket.connect, ctypes)")
        return events


class Filesystem(StrictModel):
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


_SYSCALL = re.compile(r"^[a-z_][a-z0-9_]*$")


class Seccomp(StrictModel):
    profile: Literal["compute-only"] | None = None
    deny: list[str] = Field(default_factory=list)
    allow: list[str] = Field(default_factory=list)

    @field_validator("deny", "allow")
    @classmethod
    def _syscalls(cls, names: list[str]) -> list[str]:
        for name in names:
            if not _SYSCALL.match(name):
                raise ValueError(f"{name!r} is not a system call name (e.g. execve, socket, ptrace)")
        return names


class Hardening(StrictModel):
    """A compartment's ``hardening:`` (enforced in its own process, flexos/hardening.py)."""

    env: Literal["inherit", "clean"] = "inherit"
    network: Literal["allow", "none"] = "allow"
    filesystem: Filesystem | None = None
    seccomp: Seccomp | None = None  # a profile name, or {profile, deny, allow}

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


class LibraryEntry(StrictModel):
    compartment: str
    hardening: LibraryHardening | None = None


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
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
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


def validate(src: Source) -> ConfigFile:
    """The whole file's structure and types; ConfigError listing every problem."""
    try:
        return ConfigFile.model_validate(plain(src.doc))
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
            where = _where(loc[:-1]) or "the top level"
            problems.append(src.error(loc, f"unknown key {key!r} in {where}{hint} (allowed: {', '.join(allowed)})"))
        elif kind == "missing":
            problems.append(
                src.error(loc[:-1], f"{_where(loc[:-1]) or 'the top level'} is missing the required key {loc[-1]!r}")
            )
        else:
            hint = _HINTS.get(kind, "")
            problems.append(src.error(loc, f"{_where(loc)}: {err['msg']}" + (f" ({hint})" if hint else "")))
    return problems


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


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
