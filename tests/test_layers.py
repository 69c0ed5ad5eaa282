"""Imports only go down: a flexos module may import its own layer or a lower one, never a higher.

Every module under flexos/ is parsed (not imported) and every import of a flexos module is
checked: module-level and function-level alike (a lazy import is a dependency all the same), but
not those under ``if TYPE_CHECKING:``, which never run. ``from flexos import X`` where X is a
submodule imports flexos.X. The package facade (flexos/__init__.py) is the top: it may import
anything, nothing imports it (it is only ever loaded as every module's parent, and lazily).

Also here: what ``import flexos.errors`` costs, which is what the layering is for (a compartment
imports the errors and its own layers, never the runtime or the config stack); and the same rule
for third-party packages: the core install has what the core imports, ``explore`` the rest.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import flexos

PACKAGE = Path(flexos.__file__).parent
ROOT = PACKAGE.parent

# The layers, lowest first (decided for issue 11). An entry names a module or a package, and
# covers its submodules unless one of them has its own entry (the longest listed name wins).
LAYERS: list[tuple[str, ...]] = [
    # 1: no flexos dependencies: the exceptions, Linux's numbers, the image (standard library only)
    ("flexos.errors", "flexos._linux", "flexos.image"),
    # 2: everything a peer can send, and the codec's C build
    ("flexos.wire", "flexos._msgpack"),
    # 3: what moves frames; the subinterp transport's C gate and the shm channel's hot path
    ("flexos.transports", "flexos._subinterp", "flexos._ring"),
    # 4: handles, proxies, importer, link, policy
    ("flexos.gates",),
    # 5: what a compartment's process applies to itself, and what the machine offers
    ("flexos.hardening", "flexos.probe"),
    # 6: the mechanisms, and the vm mechanism's host side
    ("flexos.drivers", "flexos.vm", "flexos.vm.image", "flexos.vm.machine"),
    # 7: entry points that run inside compartments
    ("flexos.runtime", "flexos.vm.guest"),
    # 8: flexos.yaml: reading, checking, resolving into an Image
    ("flexos.config",),
    # 9: flexos explore, flexos trace, the pytest plugin (pytest --flexos)
    ("flexos.explore", "flexos.trace", "flexos.pytest_plugin"),
    # 10: every click command
    ("flexos.cli",),
]
FACADE = "flexos"
TOP = len(LAYERS) + 1
LAYER_OF = {name: number for number, names in enumerate(LAYERS, start=1) for name in names}


def layer(module: str) -> int | None:
    """The layer of a flexos module (its longest listed prefix); None if no entry covers it."""
    if module == FACADE:
        return TOP
    name = module
    while name != FACADE:
        if name in LAYER_OF:
            return LAYER_OF[name]
        name = name.rpartition(".")[0]
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def python_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def all_modules() -> set[str]:
    """Every importable flexos module: Python sources, and the C extensions (by their stubs)."""
    return {module_name(path) for path in (*python_modules(), *PACKAGE.rglob("*.pyi"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_statements(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Every statement that can run, however deeply nested, except the bodies of ``if TYPE_CHECKING:``."""
    for node in nodes:
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _runtime_statements(node.orelse)
            continue
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from _runtime_statements([child])
            elif isinstance(child, ast.excepthandler | ast.match_case):
                yield from _runtime_statements(child.body)


def imported_modules(path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in ``path`` that can run; ``from flexos.x import y`` names
    flexos.x.y when that is a module."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in _runtime_statements(ast.parse(path.read_text(), str(path)).body):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield node.lineno, submodule if submodule in known else source


def is_flexos(module: str) -> bool:
    return module == "flexos" or module.startswith("flexos.")


def violations() -> list[str]:
    known = all_modules()
    found = []
    for path in python_modules():
        importer = module_name(path)
        own = layer(importer)
        assert own is not None, f"{path.relative_to(ROOT)}: no layer covers {importer}; add it to LAYERS"
        for line, imported in imported_modules(path, known):
            if not is_flexos(imported):
                continue
            theirs = layer(imported)
            assert theirs is not None, f"{path.relative_to(ROOT)}:{line}: no layer covers {imported}"
            if theirs > own:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {imported} (layer {theirs} > {own})")
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(module for module in all_modules() if layer(module) is None)
    assert not unplaced, f"no layer in tests/test_layers.py covers: {', '.join(unplaced)}"


def test_imports_only_go_down() -> None:
    found = violations()
    assert not found, "a module imports a higher layer:\n" + "\n".join(found)


# -- the checker itself, on sources written for it ----------------------------------------------


@pytest.fixture
def fake_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty flexos/ package under tmp_path, which the checker then reads instead of the real one."""
    package = tmp_path / "flexos"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("errors", "image", "probe"):
        (package / f"{name}.py").write_text("")
    (package / "runtime").mkdir()
    (package / "runtime" / "__init__.py").write_text("")
    (package / "runtime" / "child.py").write_text("")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    return package


def test_the_checker_finds_function_level_and_submodule_imports(fake_tree: Path) -> None:
    (fake_tree / "image.py").write_text(
        "from flexos import errors\n"  # layer 1: fine
        "def boot():\n"
        "    try:\n"
        "        from flexos import runtime\n"  # a submodule, in a function, in a try
        "    except ImportError:\n"
        "        import flexos.probe\n"
        "from flexos.runtime.child import main\n"
    )
    assert violations() == [
        "flexos/image.py:4 imports flexos.runtime (layer 7 > 1)",
        "flexos/image.py:6 imports flexos.probe (layer 5 > 1)",
        "flexos/image.py:7 imports flexos.runtime.child (layer 7 > 1)",
    ]


def test_the_checker_skips_type_checking_imports_and_follows_relative_ones(fake_tree: Path) -> None:
    (fake_tree / "probe.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from flexos.runtime import Runtime\n"
        "else:\n"
        "    from . import image\n"
        "from .runtime import child\n"
    )
    assert violations() == ["flexos/probe.py:6 imports flexos.runtime.child (layer 7 > 5)"]


def test_the_checker_refuses_a_module_without_a_layer(fake_tree: Path) -> None:
    (fake_tree / "newcomer.py").write_text("")
    with pytest.raises(AssertionError, match=r"no layer covers flexos\.newcomer"):
        violations()


# -- the facade ---------------------------------------------------------------------------------


def run_fresh(code: str, *options: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, *options, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done


def flexos_modules_after(code: str) -> list[str]:
    """The flexos modules a fresh interpreter has loaded once it ran ``code``."""
    done = run_fresh(f"{code}\nimport sys\nprint(*sys.modules)")
    return [module for module in done.stdout.split() if is_flexos(module)]


def test_importing_the_errors_loads_at_most_three_flexos_modules() -> None:
    """Measured as the issue states it: ``python -X importtime -c "import flexos.errors"``."""
    report = run_fresh("import flexos.errors", "-X", "importtime").stderr.splitlines()
    timed = [line.rpartition("|")[2].strip() for line in report if line.startswith("import time:")]
    loaded = {module for module in timed if is_flexos(module)}  # a module can be listed twice
    assert "flexos.errors" in loaded
    assert len(loaded) <= 3, loaded
    assert set(flexos_modules_after("import flexos.errors")) == loaded


def test_the_facade_loads_the_runtime_and_config_only_on_first_use() -> None:
    loaded = flexos_modules_after("import flexos; flexos.CompartmentCrashed; flexos.__version__")
    assert "flexos.runtime" not in loaded and "flexos.config" not in loaded, loaded
    assert "flexos.runtime" in flexos_modules_after("import flexos; flexos.Runtime")
    assert "flexos.config" in flexos_modules_after("import flexos; flexos.load")


def test_the_facade_names_the_real_objects() -> None:
    from flexos import config, errors, image, runtime

    assert flexos.Runtime is runtime.Runtime
    assert flexos.Image is image.Image and flexos.CompartmentSpec is image.CompartmentSpec
    assert flexos.load is config.load
    assert flexos.CompartmentCrashed is errors.CompartmentCrashed
    assert set(flexos.__all__) <= set(dir(flexos))
    assert all(getattr(flexos, name) is not None for name in flexos.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Compartment'"):
        _ = flexos.Compartment


# -- dependencies: what the core imports is what the core install pulls ----------------------------

# The top-level names the core (everything but flexos.explore, and the pytest plugin, which only
# pytest loads) may import beyond the standard library, and the distribution each comes from.
CORE_IMPORTS = {
    "msgpack": "msgpack",  # the wire
    "pyseccomp": "pyseccomp",  # hardening: seccomp filters
    "ruamel": "ruamel.yaml",  # flexos.yaml, with each key's line
    "pydantic": "pydantic",  # flexos.yaml's types
    "click": "click",  # the command line
}
EXPLORE = {"numpy", "matplotlib", "networkx", "pydot", "tqdm"}


def distribution(requirement: str) -> str:
    """The normalized distribution name of a requirement (PEP 503)."""
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name.group()).lower()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_core_imports_only_the_standard_library_and_its_own_dependencies() -> None:
    known = all_modules()
    allowed = {*sys.stdlib_module_names, "flexos", *CORE_IMPORTS}
    found = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in python_modules()
        if not module_name(path).startswith(("flexos.explore", "flexos.pytest_plugin"))
        for line, imported in imported_modules(path, known)
        if imported.partition(".")[0] not in allowed
    ]
    assert not found, "the core imports what its install does not pull:\n" + "\n".join(found)


def test_the_core_install_pulls_no_explore_dependency_and_explore_has_them_all() -> None:
    project = pyproject()["project"]
    core = {distribution(requirement) for requirement in project["dependencies"]}
    assert core == {distribution(name) for name in CORE_IMPORTS.values()}
    extras = {
        extra: {distribution(r) for r in requirements}
        for extra, requirements in project["optional-dependencies"].items()
    }
    assert EXPLORE.isdisjoint(core)
    assert extras["explore"] >= EXPLORE
    assert "flexos" in extras["experiments"]  # flexos[apps,explore]


def test_pyproject_has_ranges_and_constraints_pin_every_one_of_them() -> None:
    project = pyproject()["project"]
    declared = [*project["dependencies"], *(r for rs in project["optional-dependencies"].values() for r in rs)]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[distribution(name)] = version
    for requirement in declared:
        assert "==" not in requirement, f"pyproject.toml: {requirement!r}: a range here, the pin in constraints.txt"
        if distribution(requirement) != "flexos":
            assert distribution(requirement) in pins, f"constraints.txt pins no version of {requirement!r}"


def test_the_version_has_one_source() -> None:
    from importlib.metadata import version

    settings = pyproject()
    assert settings["project"]["dynamic"] == ["version"]
    assert settings["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flexos.__version__"}
    assert version("flexos") == flexos.__version__, "installed metadata is stale: run scripts/setup"
