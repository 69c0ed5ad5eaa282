"""Images with a fully hardened ``process`` compartment, for the hostile fixtures of issue 12.

Kept out of conftest.py (see tests/driver_variants.py): test modules import it by name.
"""

from __future__ import annotations

import contextlib
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flexos
from flexos import CompartmentSpec, Image

FIXTURES = Path(__file__).parent.parent / "fixtures"


def hardened(
    read: tuple[Path, ...] = (), write: tuple[Path, ...] = (), audit: tuple[str, ...] = ("subprocess", "ctypes")
) -> dict[str, Any]:
    """Every hardening option at once: what a malicious package author would be placed in."""
    return {
        "env": "clean",
        "network": "none",
        "filesystem": {"read": [str(path) for path in read], "write": [str(path) for path in write]},
        "seccomp": {"profile": "compute-only", "deny": [], "allow": []},
        "limits": {"memory": 512 << 20, "cpu_seconds": 60, "open_files": 64, "processes": 0},
        "audit": {"deny": list(audit)},
    }


def image(libraries: dict[str, str], **compartments: CompartmentSpec) -> Image:
    """The app in ``app`` (fcalls, default) and ``compartments``; ``libraries`` places the fixtures."""
    specs = {"app": CompartmentSpec("app", "fcalls", default=True), **compartments}
    return Image(specs, libraries, source="<tests/security>")


@contextlib.contextmanager
def booted(boot_image: Image, modules: tuple[str, ...]) -> Iterator[flexos.Runtime]:
    """``boot_image`` running in this process; ``modules`` are forgotten before and after."""
    for name in modules:
        sys.modules.pop(name, None)
    runtime = flexos.boot(boot_image)
    try:
        yield runtime
    finally:
        runtime.stop()
        for name in modules:
            sys.modules.pop(name, None)


def app_script(boot_image: Image, body: str) -> str:
    """A whole app, as a file's text: ``IMAGE`` defined, fixtures importable, then ``body``."""
    return (
        f"import sys\nsys.path.insert(0, {str(FIXTURES)!r})\n"
        f"import flexos\nIMAGE = flexos.Image.from_dict({boot_image.to_dict()!r})\n" + textwrap.dedent(body)
    )
