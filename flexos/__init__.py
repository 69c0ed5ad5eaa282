"""flexos: FlexOS-style flexible isolation for Python applications.

Place an app's components (modules, packages, C extensions) in compartments, back each by an
isolation mechanism, and change it all in one flexos.yaml, with no change to the components.

    with flexos.boot("flexos.yaml"):
        import sqlite3            # lives in the compartment flexos.yaml places it in

This package is a lazy facade (PEP 562): the errors are imported with it, everything else on
first use, so that ``import flexos.errors`` in a compartment loads no runtime and no config stack.
"""

from __future__ import annotations

import os

from flexos.errors import (
    CompartmentCrashed,
    CompartmentStartError,
    ConfigError,
    DriverUnavailable,
    FlexosError,
    GateError,
    ProtocolError,
    RemoteTraceback,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (5 ms), as type checkers allow
if TYPE_CHECKING:
    from typing import Any

    from flexos.config import load
    from flexos.image import CompartmentSpec, Image
    from flexos.runtime import Runtime

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "CompartmentSpec": "flexos.image",
    "Image": "flexos.image",
    "Runtime": "flexos.runtime",
    "load": "flexos.config",  # load(path="flexos.yaml") -> Image; ConfigError, warns ConfigWarning
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flexos' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _image(config: str | os.PathLike[str] | Image | dict[str, Any] | None) -> Image:
    """``config`` itself if it is an Image, an image of flexos.yaml's shape given as a dict, else the
    flexos.yaml at that path (None: the default file); validated alike."""
    from flexos.image import Image

    if isinstance(config, Image):
        return config
    if isinstance(config, dict):
        from flexos.config import load_mapping

        return load_mapping(config)
    from flexos.config import load

    return load() if config is None else load(os.fspath(config))


def boot(config: str | os.PathLike[str] | Image | dict[str, Any] | None = None, *, stats: bool = False) -> Runtime:
    """Boot an image (a flexos.yaml path, default ./flexos.yaml, the same as a dict, or an Image) in this process and
    return its running :class:`Runtime`; use it as a context manager::

        with flexos.boot("flexos.yaml"):
            import sqlite3          # a gate to the compartment sqlite3 is placed in

    ``stats=True``: the gates count what they carry, read with :meth:`Runtime.stats` (as ``flexos run --stats``).
    """
    import sys
    import warnings

    from flexos import runtime

    booted = runtime.boot(_image(config), stats=stats)
    displaced = {id(module): name for name, module in booted.displaced.items()}
    main = sys.modules.get("__main__")
    for bound, value in list(vars(main).items()) if main is not None else ():
        if id(value) in displaced:
            what = f"the local module {displaced[id(value)]!r}"
            module = displaced[id(value)]
        else:  # a function or class taken from one (from zipfile import ZipFile)
            written = getattr(value, "__module__", None) if callable(value) else None
            if type(written) is not str or written not in booted.displaced:
                continue
            module = written
            what = f"{module}.{getattr(value, '__qualname__', bound)} of the local module {module!r}"
        owner = booted.image.compartment_of(module)
        warnings.warn(
            f"{bound!r} in __main__ is {what}, imported before flexos.boot(); "
            f"{booted.image.source} places it in compartment {owner!r}: import it after boot to reach it there",
            RuntimeWarning,
            stacklevel=2,
        )
    return booted


def run_path(
    path: str, args: list[str] | tuple[str, ...] = (), config: str | os.PathLike[str] | Image | None = None
) -> None:
    """Run a script unmodified under ``config`` (as :func:`boot`), as ``python path args...`` would."""
    from flexos import runtime

    runtime.run_path(path, list(args), _image(config))


def run_module(
    module: str, args: list[str] | tuple[str, ...] = (), config: str | os.PathLike[str] | Image | None = None
) -> None:
    """Run a module unmodified under ``config`` (as :func:`boot`), as ``python -m module args...`` would."""
    from flexos import runtime

    runtime.run_module(module, list(args), _image(config))


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
    "RemoteTraceback",
    "Runtime",
    "__version__",
    "boot",
    "load",
    "run_module",
    "run_path",
]
