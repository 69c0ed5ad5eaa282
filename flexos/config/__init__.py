"""Load and validate flexos.yaml into an :class:`~flexos.image.Image`.

Structure and types are checked by pydantic, the rules between entries (one default, declared
compartments, unique names) here; every problem is reported with the file, the line, and what to
change. YAML is read with ruamel.yaml because it keeps the line of every key.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from flexos.errors import ConfigError
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image

_NAME = r"^[A-Za-z_][A-Za-z0-9_-]*$"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class ConfigWarning(UserWarning):
    """A flexos.yaml that works but is probably not what its author meant."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# -- per-driver mechanism options (FlexOS puts driver options inside ``mechanism:`` too) --------
class FcallsMechanism(_Model):
    driver: Literal["fcalls"]
    strict: bool = False


class ProcessMechanism(_Model):
    driver: Literal["process"]
    spin_us: int = Field(200, ge=0, le=1_000_000)
    start_timeout: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)


class SubinterpMechanism(_Model):
    driver: Literal["subinterp"]


class _GuestFiles(_Model):
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


class VmMechanism(_Model):
    driver: Literal["vm"]
    memory: int | str = 256 << 20  # bytes, or a size such as 512MiB
    vcpus: int = Field(1, ge=1, le=64)
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout: float = Field(120.0, gt=0, le=3600, allow_inf_nan=False)
    start_timeout: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False)
    spin_us: int = Field(200, ge=0, le=1_000_000)
    network: Literal["none", "user"] = "none"
    filesystem: _GuestFiles = Field(default_factory=_GuestFiles)

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: int | str) -> int:
        size = parse_size(value)
        if size < 128 << 20:
            raise ValueError("a guest needs at least 128MiB to start Python")
        return size


class _NotImplementedMechanism(_Model):
    driver: str


MECHANISMS: dict[str, type[_Model]] = {
    "fcalls": FcallsMechanism,
    "process": ProcessMechanism,
    "subinterp": SubinterpMechanism,
    "vm": VmMechanism,
    "intel-pku": _NotImplementedMechanism,
}


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


class _Limits(_Model):
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


class _Audit(_Model):
    deny: list[str] = Field(default_factory=list)

    @field_validator("deny")
    @classmethod
    def _events(cls, events: list[str]) -> list[str]:
        for event in events:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", event):
                raise ValueError(f"{event!r} is not an audit event name (e.g. subprocess, socket.connect, ctypes)")
        return events


class _Filesystem(_Model):
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


_SYSCALL = re.compile(r"^[a-z_][a-z0-9_]*$")


class _Seccomp(_Model):
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


class _Hardening(_Model):
    env: Literal["inherit", "clean"] = "inherit"
    network: Literal["allow", "none"] = "allow"
    filesystem: _Filesystem | None = None
    seccomp: _Seccomp | None = None  # a profile name, or {profile, deny, allow}

    @field_validator("seccomp", mode="before")
    @classmethod
    def _seccomp(cls, value: Any) -> Any:
        return {"profile": value} if isinstance(value, str) else value

    limits: _Limits = Field(default_factory=_Limits)
    audit: _Audit = Field(default_factory=_Audit)


class _Compartment(_Model):
    name: str = Field(pattern=_NAME)
    mechanism: dict[str, Any]
    default: bool = False
    restart: Literal["on-failure", "never"] = "on-failure"
    timeout: float | None = Field(None, gt=0, le=86400, allow_inf_nan=False)
    hardening: _Hardening | None = None


class _LibraryHardening(_Model):
    """What can be enforced for one library inside a shared process: its audit policy."""

    audit: _Audit


class _Library(_Model):
    compartment: str
    hardening: _LibraryHardening | None = None


class _Config(_Model):
    name: str | None = None
    compartments: list[_Compartment] = Field(min_length=1)
    libraries: dict[str, _Library] = Field(default_factory=dict)


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


class _Source:
    """A parsed YAML document that can answer "which line is this path on?"."""

    def __init__(self, path: str, doc: Any) -> None:
        self.path = path
        self.doc = doc

    def line(self, loc: tuple[Any, ...]) -> int:
        """The line of the deepest part of ``loc`` that ruamel recorded a position for."""
        node, line = self.doc, 1
        for key in loc:
            try:
                if isinstance(node, CommentedMap) and key in node:
                    position = node.lc.key(key)
                elif isinstance(node, CommentedSeq) and isinstance(key, int) and key < len(node):
                    position = node.lc.item(key)
                else:
                    break
                node = node[key]
                line = position[0] + 1
            except (KeyError, TypeError, IndexError, AttributeError):
                break  # merged (<<:) keys and tagged nodes carry no position of their own
        return line

    def error(self, loc: tuple[Any, ...], message: str) -> str:
        return f"{self.path}:{self.line(loc)}: {message}"


def _where(loc: tuple[Any, ...]) -> str:
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _allowed_keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _model_at(loc: tuple[Any, ...], mechanism_model: type[BaseModel] | None = None) -> type[BaseModel]:
    if mechanism_model is not None:
        return mechanism_model
    if loc and loc[0] == "compartments":
        return _Compartment
    if loc and loc[0] == "libraries":
        return _Library
    return _Config


def _pydantic_problems(
    src: _Source, exc: ValidationError, prefix: tuple[Any, ...] = (), mechanism: type[BaseModel] | None = None
) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = prefix + tuple(err["loc"])
        kind = err["type"]
        where = _where(loc)
        if kind == "extra_forbidden":
            key = loc[-1]
            allowed = _allowed_keys(_model_at(loc, mechanism))
            guess = difflib.get_close_matches(str(key), allowed.split(", "), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            problems.append(
                src.error(
                    loc, f"unknown key {key!r} in {_where(loc[:-1]) or 'the top level'}{hint} (allowed: {allowed})"
                )
            )
        elif kind == "missing":
            problems.append(
                src.error(loc[:-1], f"{_where(loc[:-1]) or 'the top level'} is missing the required key {loc[-1]!r}")
            )
        else:
            hint = _HINTS.get(kind, "")
            problems.append(src.error(loc, f"{where}: {err['msg']}" + (f" ({hint})" if hint else "")))
    return problems


def _plain(node: Any) -> Any:
    """ruamel's round-trip types (anchored scalars are int/str subclasses) as plain Python."""
    if isinstance(node, dict):
        return {_plain(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    if isinstance(node, ScalarBoolean):
        return bool(node)
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node


def _read(path: Path) -> _Source:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file (create a flexos.yaml, or pass -c FILE)"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        doc = YAML(typ="rt").load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise ConfigError([f"{path}:{line}: not valid YAML: {problem}"]) from None
    except YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    except Exception as exc:  # the YAML library failing on odd input (e.g. key `-_`, huge timestamps)
        raise ConfigError(
            [f"{path}: cannot be read as YAML ({type(exc).__name__}: {exc}); simplify the odd value"]
        ) from None
    if doc is None:
        raise ConfigError([f"{path}:1: the file is empty; it needs a 'compartments:' list (see docs/config.md)"])
    if not isinstance(doc, CommentedMap):
        raise ConfigError([f"{path}:1: the top level must be a mapping with 'compartments:' and 'libraries:'"])
    return _Source(str(path), doc)


def parse(path: str | Path) -> tuple[Image, list[str]]:
    """Validate ``path``; return the image and the warnings, or raise ConfigError listing every problem."""
    return parse_document(_read(Path(path)))


def parse_document(src: _Source) -> tuple[Image, list[str]]:
    """Validate a document already read (the base of an explore space is one without its ``explore:``)."""
    try:
        config = _Config.model_validate(_plain(src.doc))
    except ValidationError as exc:
        raise ConfigError(_pydantic_problems(src, exc)) from None

    problems: list[str] = []
    specs: dict[str, CompartmentSpec] = {}
    first_line: dict[str, int] = {}
    for index, comp in enumerate(config.compartments):
        loc = ("compartments", index)
        if comp.name in first_line:
            problems.append(
                src.error(
                    loc + ("name",),
                    f"compartment {comp.name!r} is declared twice (first on line "
                    f"{first_line[comp.name]}); give each compartment its own name",
                )
            )
            continue
        first_line[comp.name] = src.line(loc + ("name",))
        driver = comp.mechanism.get("driver")
        mloc = loc + ("mechanism",)
        if driver is None:
            problems.append(
                src.error(
                    mloc, f"compartment {comp.name!r}: mechanism needs a 'driver' (one of: {', '.join(MECHANISMS)})"
                )
            )
            continue
        model = MECHANISMS.get(driver) if isinstance(driver, str) else None
        if model is None:
            guess = difflib.get_close_matches(str(driver), list(MECHANISMS), n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            problems.append(
                src.error(
                    mloc + ("driver",), f"unknown driver {driver!r}{hint} (known drivers: {', '.join(MECHANISMS)})"
                )
            )
            continue
        try:
            options = model.model_validate(dict(comp.mechanism)).model_dump()
        except ValidationError as exc:
            problems.extend(_pydantic_problems(src, exc, mloc, model))
            continue
        options.pop("driver")
        hardening = comp.hardening.model_dump() if comp.hardening else {}
        if hardening and driver != "process":
            problems.append(
                src.error(
                    loc + ("hardening",),
                    f"compartment {comp.name!r}: hardening needs its own "
                    f"process (driver 'process'); a {driver!r} compartment shares the app's",
                )
            )
            continue
        if comp.timeout is not None and driver not in ("process", "vm"):
            problems.append(
                src.error(
                    loc + ("timeout",),
                    f"compartment {comp.name!r}: a timeout needs driver "
                    f"'process' or 'vm' (a stuck {driver!r} call runs on the caller's own thread)",
                )
            )
            continue
        specs[comp.name] = CompartmentSpec(
            comp.name, driver, options, comp.default, comp.restart, comp.timeout, hardening
        )

    defaults = [i for i, c in enumerate(config.compartments) if c.default]
    if not defaults:
        problems.append(
            src.error(
                ("compartments",),
                "no compartment has 'default: true'; mark exactly one (the app's own code runs there)",
            )
        )
    elif config.compartments[defaults[0]].mechanism.get("driver") == "process" and len(defaults) == 1:
        problems.append(
            src.error(
                ("compartments", defaults[0], "mechanism", "driver"),
                f"compartment {config.compartments[defaults[0]].name!r} is the default one, which is "
                "the app's own process; give it driver 'fcalls' and isolate the other compartments",
            )
        )
    elif len(defaults) > 1:
        lines = ", ".join(str(src.line(("compartments", i, "default"))) for i in defaults)
        problems.append(
            src.error(
                ("compartments", defaults[1], "default"),
                f"{len(defaults)} compartments have 'default: true' (lines {lines}); keep exactly one",
            )
        )

    libraries: dict[str, str] = {}
    library_hardening: dict[str, dict[str, Any]] = {}
    for module, lib in config.libraries.items():
        loc = ("libraries", module)
        if not _MODULE.match(module):
            problems.append(
                src.error(
                    loc,
                    f"library {module!r} is not an importable module name "
                    "(dotted Python identifiers, e.g. 'sqlite3' or 'myapp.parsers')",
                )
            )
            continue
        if module == "flexos" or module.startswith("flexos."):
            problems.append(
                src.error(
                    loc,
                    f"library {module!r} cannot be placed: flexos itself runs in every compartment; remove this entry",
                )
            )
            continue
        if lib.compartment not in first_line:
            guess = difflib.get_close_matches(lib.compartment, list(first_line), n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            problems.append(
                src.error(
                    loc + ("compartment",),
                    f"library {module!r} is placed in compartment "
                    f"{lib.compartment!r}, which is not declared; {hint}declared: "
                    f"{', '.join(first_line)}",
                )
            )
            continue
        if lib.hardening is not None:
            owner = specs.get(lib.compartment)
            if owner is not None and owner.driver != "process":
                problems.append(
                    src.error(
                        loc + ("hardening",),
                        f"library {module!r}: hardening needs a 'process' "
                        f"compartment; {lib.compartment!r} shares the app's process",
                    )
                )
                continue
            library_hardening[module] = lib.hardening.model_dump()
        libraries[module] = lib.compartment
    if problems:
        raise ConfigError(problems)

    notes = []
    used = set(libraries.values())
    for index, comp in enumerate(config.compartments):
        if not comp.default and comp.name not in used:
            notes.append(
                src.error(
                    ("compartments", index, "name"),
                    f"warning: compartment {comp.name!r} is "
                    "declared but no library is placed in it; place a library in it or remove it",
                )
            )
    return Image(specs, libraries, source=src.path, library_hardening=library_hardening), notes


def load(path: str | Path = DEFAULT_CONFIG) -> Image:
    """Load a flexos.yaml; problems raise ConfigError, suspicious parts emit a ConfigWarning."""
    image, notes = parse(path)
    for note in notes:
        warnings.warn(note, ConfigWarning, stacklevel=2)
    return image
