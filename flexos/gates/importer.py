"""Gate insertion at import time: the counterpart of FlexOS's Coccinelle gate rewriting.

A meta-path finder placed first in ``sys.meta_path``: when code in this compartment imports a
module that the image places in another compartment, the module is imported *there* and this
side gets a :class:`~flexos.gates.proxies.ModuleProxy`. Modules placed here, and modules not
listed at all, import normally.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Callable, Iterator
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec, PathFinder
from typing import TYPE_CHECKING, Any

from flexos.gates.proxies import ModuleOwner, ModuleProxy

if TYPE_CHECKING:
    from flexos.image import Image


class GateLoader(Loader):
    def __init__(self, compartment: ModuleOwner, names: list[str]) -> None:
        self.compartment = compartment
        self.names = names

    def create_module(self, spec: ModuleSpec) -> ModuleProxy:
        return ModuleProxy(spec.name, self.compartment)

    def exec_module(self, module: types.ModuleType) -> None:
        # ``from module import *`` binds these in the importer's namespace: never a name the owner
        # chose to shadow the importer's own (__builtins__, __name__, a _private one).
        public = [name for name in self.names if name.isidentifier() and not name.startswith("_")]
        types.ModuleType.__setattr__(module, "__all__", public)


class GateFinder(MetaPathFinder):
    def __init__(self, image: Image, local: str, resolve: Callable[[str], ModuleOwner]) -> None:
        self.image = image
        self.local = local
        self.resolve = resolve
        self._bypass = threading.local()

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        owner = self.image.compartment_of(fullname)
        if owner is None or owner == self.local or owner == getattr(self._bypass, "owner", None):
            return None
        compartment = self.resolve(owner)
        if compartment.direct:
            return None
        is_package, names = compartment.import_module(fullname)
        spec = ModuleSpec(
            fullname, GateLoader(compartment, names), origin=f"flexos compartment {owner!r}", is_package=is_package
        )
        if is_package:  # where its submodules placed here (or unlisted) are found: the package's own folders
            found = PathFinder.find_spec(fullname, path)
            if found is not None and found.submodule_search_locations is not None:
                spec.submodule_search_locations = list(found.submodule_search_locations)
        return spec

    @contextlib.contextmanager
    def bypass(self, owner: str) -> Iterator[None]:
        """In this thread, modules placed in ``owner`` import for real (an in-process compartment
        loading its own modules); modules placed anywhere else still get gates."""
        previous = getattr(self._bypass, "owner", None)
        self._bypass.owner = owner
        try:
            yield
        finally:
            self._bypass.owner = previous
