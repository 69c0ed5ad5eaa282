"""A YAML document read with the line of every key, so that every problem can name its line.

ruamel.yaml is used because it keeps positions; :func:`plain` turns its round-trip types into the
plain data that validation and the Image see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.scalarbool import ScalarBoolean

from flexos.errors import ConfigError


class Source:
    """A parsed YAML document that can answer "which line is this path on?"."""

    def __init__(self, path: str, doc: CommentedMap) -> None:
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
        """``FILE:LINE: message``, with the line of ``loc``."""
        return f"{self.path}:{self.line(loc)}: {message}"

    def at(self, loc: tuple[Any, ...]) -> str:
        """Where ``loc`` is written, as a note names it: ``FILE:LINE``."""
        return f"{self.path}:{self.line(loc)}"

    @property
    def base(self) -> Path:
        """The directory relative paths in the document are taken from: the file's."""
        return Path(self.path).resolve().parent


class MappingSource(Source):
    """A configuration given as Python data (``flexos.boot({...})``), of the same shape as
    flexos.yaml: problems name the key path instead of a line."""

    def __init__(self, path: str, doc: dict[str, Any]) -> None:
        super().__init__(path, doc)  # type: ignore[arg-type]  # read as a mapping, never by line

    def line(self, loc: tuple[Any, ...]) -> int:
        return 0

    def error(self, loc: tuple[Any, ...], message: str) -> str:
        at = where(loc) or "the top level"
        return f"{self.path}: {message}" if message.startswith(f"{at}") else f"{self.path}: {at}: {message}"

    def at(self, loc: tuple[Any, ...]) -> str:
        return f"{self.path} {where(loc)}"

    @property
    def base(self) -> Path:
        return Path.cwd()


def where(loc: tuple[Any, ...]) -> str:
    """A location in the document as written in messages: ``compartments[1].hardening``."""
    text = ""
    for key in loc:
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def read_source(path: Path) -> Source:
    """Read ``path`` as a YAML mapping; anything else raises ConfigError naming the file (and line)."""
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
    return Source(str(path), doc)


def plain(node: Any) -> Any:
    """ruamel's round-trip types (anchored scalars are int/str subclasses) as plain Python."""
    if isinstance(node, dict):
        return {plain(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    if isinstance(node, ScalarBoolean):
        return bool(node)
    for kind in (bool, int, float, str):
        if isinstance(node, kind):
            return kind(node)
    return node
