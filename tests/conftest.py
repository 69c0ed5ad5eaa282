"""Shared fixtures: test libraries under tests/fixtures, booted into a compartment per test.

The fixture libraries know nothing of flexos. Each test boots its own image, so a crash, a
restart or a compromised compartment in one test cannot leak into the next.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from driver_variants import DRIVER_VARIANTS, GATED_DRIVERS

import flexos
from flexos import CompartmentSpec, Image

FIXTURES = Path(__file__).parent / "fixtures"
# Compartment processes inherit the parent's sys.path when they start, so this must come first.
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

FIXTURE_MODULES = ("complib", "hostile", "appside", "interplib", "interpflag")


def make_image(variant: str, libraries: dict[str, str] | None = None, restart: str = "on-failure") -> Image:
    """An image with the app in ``app`` and the fixture libraries in ``box`` (driver ``variant``)."""
    driver, options = DRIVER_VARIANTS[variant]
    libraries = libraries if libraries is not None else {"complib": "box"}
    compartments = {"app": CompartmentSpec("app", "fcalls", default=True)}
    for name in sorted(set(libraries.values())):
        compartments[name] = CompartmentSpec(name, driver, dict(options), restart=restart)
    return Image(compartments=compartments, libraries=libraries, source=f"<test image: {variant}>")


def _forget_fixture_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FIXTURE_MODULES:
            del sys.modules[name]


@pytest.fixture
def boot() -> Iterator[Callable[..., flexos.Runtime]]:
    """Boot images for one test; every runtime is stopped and fixture modules forgotten after it."""
    runtimes: list[flexos.Runtime] = []

    def _boot(
        variant: str, libraries: dict[str, str] | None = None, restart: str = "on-failure", stats: bool = False
    ) -> flexos.Runtime:
        _forget_fixture_modules()
        runtime = flexos.boot(make_image(variant, libraries, restart), stats=stats)
        runtimes.append(runtime)
        return runtime

    yield _boot
    for runtime in reversed(runtimes):
        runtime.stop()
    _forget_fixture_modules()


@pytest.fixture(params=GATED_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The driver variant of compartment ``box`` (a module may override this fixture)."""
    return request.param


@pytest.fixture
def runtime(boot: Callable[..., flexos.Runtime], driver: str) -> flexos.Runtime:
    """A started runtime with the fixture library ``complib`` placed in compartment ``box``."""
    return boot(driver)


@pytest.fixture
def complib(runtime: flexos.Runtime):
    """``import complib`` as the app would write it: a gate to compartment ``box``."""
    return importlib.import_module("complib")


@pytest.fixture
def library_pid(runtime: flexos.Runtime, complib) -> int:
    """The pid the library runs in: the compartment's own process (inside its guest for vm), or ours for fcalls."""
    complib.getpid()  # make sure the compartment has started
    compartment = runtime.compartments["box"]
    return getattr(compartment.driver, "guest_pid", None) or compartment.pid or os.getpid()


@pytest.fixture
def run_app(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``body`` as an app in its own interpreter, with ``IMAGE`` (a make_image) defined.

    For tests whose failure mode is a crash of the app: it must not take the test runner down.
    """

    def _run(
        body: str, variant: str = "process", libraries: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        image = make_image(variant, libraries).to_dict()
        script = tmp_path / "isolated_app.py"
        preamble = (
            f"import sys\nsys.path.insert(0, {str(FIXTURES)!r})\n"
            f"import flexos\nIMAGE = flexos.Image.from_dict({image!r})\n"
        )
        script.write_text(preamble + textwrap.dedent(body))
        return subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )

    return _run
