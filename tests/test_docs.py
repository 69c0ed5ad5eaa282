"""The docs name only APIs that exist: every name in docs/config.md's "Python API" section is
looked up on real objects (an Image, a Runtime booted from it, one of its compartments).

What counts as a name: in the code block, every ``flexos.…`` expression; in the prose, every code
span that starts with a flexos name (``flexos.boot``, ``Image.compartment_of(module)``,
``Runtime.compartments[name]``). A bullet whose first span is an object rather than a function
(the ``Image`` bullet, the ``Runtime.compartments[name]`` one) describes that object: its other
bare spans (``default``, ``.pid``) are the object's attributes. A call's parameter names must be the
function's own, and a literal default its default. Spans of anything else (``sys.modules``,
``with``) and file names (``flexos.yaml``) are prose.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import textwrap
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import flexos
from flexos.image import CompartmentSpec, Image

DOCS = Path(__file__).resolve().parent.parent / "docs"
FILE_NAME = re.compile(r"\.(ya?ml|py|md|toml)$")  # `flexos.yaml` is a file, not flexos's attribute yaml


@dataclass
class Reference:
    """One name the docs use: where, the text, and the object its bare names belong to (if any)."""

    line: int
    text: str
    subject: str | None = None


def python_section(markdown: str, heading: str = "## Python API") -> tuple[int, list[str]]:
    """(number of its first line, its lines): from ``heading`` to the next ``## `` heading."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return start + 1, lines[start:end]


def references(markdown: str) -> Iterator[Reference]:
    first, lines = python_section(markdown)
    code: list[tuple[int, str]] | None = None
    subject: str | None = None
    for number, line in enumerate(lines, start=first):
        if line.startswith("```"):
            if code is not None:
                yield from _code_references(code)
            code = [] if code is None else None
            continue
        if code is not None:
            code.append((number, line))
            continue
        if line.startswith("- "):
            head = re.match(r"- `([^`]+)`", line)
            subject = head.group(1) if head else None
        elif not line.startswith("  "):
            subject = None
        for span in re.findall(r"`([^`]+)`", line):
            yield Reference(number, span.split(" -> ")[0].strip(), subject)


def _code_references(code: list[tuple[int, str]]) -> Iterator[Reference]:
    tree = ast.parse("\n".join(text for _, text in code))
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner and _root(node) == "flexos":
            yield Reference(code[node.lineno - 1][0], ast.unparse(node))


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


class Missing(Exception):
    """A name the docs use does not exist (or a parameter or default differs)."""


class Resolver:
    """Looks names up on real objects: a class stands for the instance given for it."""

    def __init__(self, instances: Mapping[type, object]) -> None:
        self.instances = instances
        self.roots = {"flexos": flexos, **{name: getattr(flexos, name) for name in flexos.__all__}}

    def subject(self, reference: Reference) -> object | None:
        """The object a bullet describes, if it starts with one (not with a function or module)."""
        if reference.subject is None:
            return None
        try:
            found = self.resolve(_parse(reference.subject.split(" -> ")[0]))
        except Missing:
            return None  # reported as the bullet's own first name
        if isinstance(found, type):
            found = self.instances.get(found, found)
        described = isinstance(found, type) or callable(found) or isinstance(found, types.ModuleType)
        return None if described else found

    def resolve(self, node: ast.expr, subject: object | None = None) -> object:
        if isinstance(node, ast.Name):
            if node.id in self.roots:
                return self.roots[node.id]
            if subject is None:
                raise Missing(f"no such name {node.id!r}")
            return subject if node.id == "_subject" else self.attribute(subject, node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(self.resolve(node.value, subject), node.attr)
        if isinstance(node, ast.Subscript):
            container = self.resolve(node.value, subject)
            if not isinstance(container, Mapping) or not container:
                raise Missing(f"{ast.unparse(node.value)} is not a mapping with entries")
            return next(iter(container.values()))
        if isinstance(node, ast.Call):
            function = self.resolve(node.func, subject)
            self.check_parameters(function, node)
            return function
        raise Missing(f"{ast.unparse(node)!r} is not a name")

    def attribute(self, owner: object, name: str) -> object:
        instance = self.instances.get(owner, owner) if isinstance(owner, type) else owner
        if hasattr(instance, name):
            return getattr(instance, name)
        if isinstance(owner, types.ModuleType):  # a submodule not imported yet
            try:
                return importlib.import_module(f"{owner.__name__}.{name}")
            except ModuleNotFoundError:
                pass
        what = owner.__name__ if isinstance(owner, type | types.ModuleType) else type(owner).__name__
        raise Missing(f"{what} has no attribute {name!r}")

    def check_parameters(self, function: Any, call: ast.Call) -> None:
        parameters = inspect.signature(function).parameters
        named = [(arg.id, None) for arg in call.args if isinstance(arg, ast.Name)]
        named += [(keyword.arg, keyword.value) for keyword in call.keywords if keyword.arg]
        for name, value in named:
            if name not in parameters:
                raise Missing(f"{ast.unparse(call.func)} has no parameter {name!r} (it has {', '.join(parameters)})")
            if isinstance(value, ast.Constant) and value.value is not Ellipsis:
                default = parameters[name].default
                if default != value.value:
                    raise Missing(f"{ast.unparse(call.func)}'s {name} defaults to {default!r}, not {value.value!r}")


def _parse(text: str) -> ast.expr:
    try:
        return ast.parse(f"_subject{text}" if text.startswith(".") else text, mode="eval").body
    except SyntaxError:
        return ast.Constant(text)  # prose, not a name


def problems(markdown: str, resolver: Resolver, source: str) -> tuple[list[str], int]:
    """(what the docs name that does not exist, how many names were checked)."""
    found, checked = [], 0
    for reference in references(markdown):
        node = _parse(reference.text)
        subject = resolver.subject(reference)
        if (
            FILE_NAME.search(reference.text)
            or isinstance(node, ast.Constant)
            or (_root(node) not in resolver.roots and subject is None)
        ):
            continue  # prose, or a name of something else (sys.modules)
        checked += 1
        try:
            resolver.resolve(node, subject)
        except Missing as missing:
            found.append(f"{source}:{reference.line}: `{reference.text}`: {missing}")
    return found, checked


@pytest.fixture(scope="module")
def resolver() -> Iterator[Resolver]:
    """Real objects: a Runtime booted from an Image with a compartment (never started here)."""
    spec = CompartmentSpec("db", "process", {"spin_us": 200, "start_timeout": 30.0})
    image = Image({"app": CompartmentSpec("app", "fcalls", {"strict": False}, default=True), "db": spec}, {"x": "db"})
    with flexos.boot(image) as runtime:
        yield Resolver({Image: image, CompartmentSpec: spec, flexos.Runtime: runtime})


def test_every_api_named_in_configs_python_section_exists(resolver: Resolver) -> None:
    found, checked = problems((DOCS / "config.md").read_text(), resolver, "docs/config.md")
    assert not found, "docs name APIs that do not exist:\n" + "\n".join(found)
    assert checked >= 20, f"only {checked} names were checked: is the section still there?"


def test_the_check_catches_names_that_do_not_exist(resolver: Resolver) -> None:
    """The two the issue found (docs/config.md named them before it was fixed), and a wrong default."""
    section = textwrap.dedent(
        """\
        ## Python API

        ```python
        flexos.start("flexos.yaml")
        ```

        - `flexos.load(path="app.yaml")`: reads it.
        - `Image`: `compartments`, `compartment_of(module)`, `modules_in(compartment)`.
        - `Runtime.compartments[name]`: `.pid` and `.uptime`.
        - `flexos.config.parse(file)` and `sys.modules`, which is prose.
        """
    )
    found, checked = problems(section, resolver, "doc")
    assert [problem.split(": ", 2)[1] for problem in found] == [
        "`flexos.start`",
        '`flexos.load(path="app.yaml")`',
        "`modules_in(compartment)`",
        "`.uptime`",
        "`flexos.config.parse(file)`",
    ], found
    assert checked == 10


def test_the_effective_policy_in_config_md_is_what_check_prints(tmp_path: Path) -> None:
    """docs/config.md's ``flexos check`` sample, run again: every line but the interpreter's own
    paths (which depend on the install, and which the doc shortens) is printed as shown."""
    import subprocess
    import sys

    text = (DOCS / "config.md").read_text()
    start = text.index("For `/srv/app/flexos.yaml`")
    yaml = text[text.index("```yaml\n", start) + 8 : text.index("```\n", text.index("```yaml\n", start) + 8)]
    shown_at = text.index("```\neffective policy", start) + 4
    shown = text[shown_at : text.index("```\n", shown_at)].splitlines()
    app = tmp_path / "app"
    (app / "parsers").mkdir(parents=True)
    (app / "data").mkdir()
    (app / "parsers" / "__init__.py").write_text("import util\n")
    (app / "util.py").write_text("")
    (app / "flexos.yaml").write_text(yaml)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flexos"), "check"], cwd=app, capture_output=True, text=True, timeout=60
    )
    out = done.stdout.splitlines()
    printed = out[out.index(shown[0]) : out.index("this machine:")]
    own_code = "(the interpreter's own code"
    assert [line for line in printed if own_code not in line] == [
        line.replace("/srv/app", str(app)) for line in shown if own_code not in line
    ]
    assert len(printed) == len(shown)
