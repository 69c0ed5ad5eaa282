"""flexos: FlexOS-style flexible isolation for Python applications.

Place an app's components (modules, packages, C extensions) in compartments, back each by an
isolation mechanism, and change it all in one flexos.yaml, with no change to the components.

    with flexos.boot("flexos.yaml"):
        import sqlite3            # lives in the compartment flexos.yaml places it in
"""

from flexos.errors import (
    CompartmentCrashed,
    CompartmentStartError,
    ConfigError,
    DriverUnavailable,
    FlexosError,
    GateError,
    ProtocolError,
)
from flexos.image import CompartmentSpec, Image
from flexos.runtime import Runtime, boot, run_module, run_path


def load(path: str = "flexos.yaml") -> Image:
    """Validate a flexos.yaml and return its image (raises ConfigError naming file and line)."""
    from flexos.config import load as _load

    return _load(path)


__all__ = [
    "CompartmentCrashed",
    "CompartmentSpec",
    "CompartmentStartError",
    "ConfigError",
    "DriverUnavailable",
    "FlexosError",
    "GateError",
    "Image",
    "ProtocolError",
    "Runtime",
    "boot",
    "load",
    "run_module",
    "run_path",
]
