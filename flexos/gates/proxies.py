"""Proxies: what code in one compartment holds in place of another compartment's objects.

A remote class is mirrored by a local class synthesized from its description (methods, the dunder
protocols it implements, its bases), so that ``isinstance``, ``except``, ``len()``, ``with``,
iteration and method calls behave as without flexos. Exception classes are mirrored as real local
exception classes; their instances cross by value. Every other remote object is an instance of
its mirrored class holding a handle.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

from flexos.wire.protocol import Op

if TYPE_CHECKING:
    from flexos.gates.link import Link

# Dunder method -> OPERATOR wire name. A proxy class defines exactly the ones its remote class has.
DUNDERS: dict[str, str] = {
    "__len__": "len",
    "__iter__": "iter",
    "__next__": "next",
    "__bool__": "bool",
    "__getitem__": "getitem",
    "__setitem__": "setitem",
    "__delitem__": "delitem",
    "__contains__": "contains",
    "__call__": "call",
    "__enter__": "enter",
    "__exit__": "exit",
    "__eq__": "eq",
    "__ne__": "ne",
    "__lt__": "lt",
    "__le__": "le",
    "__gt__": "gt",
    "__ge__": "ge",
    "__str__": "str",
    "__int__": "int",
    "__float__": "float",
    "__index__": "index",
}


def _lookup(cls: type, name: str) -> Any:
    """``name`` as instances of ``cls`` see it (the class's MRO, never its metaclass)."""
    for base in cls.__mro__:
        if name in base.__dict__:
            return base.__dict__[name]
    return None


def describe_class(cls: type) -> dict[str, Any]:
    """What a peer needs to mirror ``cls``: run by the class's owner for a DESCRIBE op."""
    dunders = []
    for dunder, wire in DUNDERS.items():
        mine = _lookup(cls, dunder)
        if mine is not None and mine is not object.__dict__.get(dunder):
            dunders.append(wire)
    methods = []
    for name in dir(cls):
        if name.startswith(("__", "_flexos")):  # a peer refuses these (flexos's own machinery)
            continue
        try:
            attr = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(attr, (staticmethod, classmethod, type, property)):
            continue
        if callable(attr) and hasattr(type(attr), "__get__"):
            methods.append(name)
    hash_method = _lookup(cls, "__hash__")
    if hash_method is None:
        hashing = "none"
    elif hash_method is object.__hash__:
        hashing = "identity"
    else:
        hashing = "remote"
    module = getattr(cls, "__module__", None) or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return {
        "name": cls.__name__,
        "qualname": qualname,
        "module": module,
        "bases": [base for base in cls.__bases__ if base is not object],
        "exception": issubclass(cls, BaseException),
        "methods": methods,
        "dunders": dunders,
        "hash": hashing,
        # Reachable as module.qualname: its mirror can be found again after a restart.
        "by_name": _named_path_reaches(module, qualname, cls),
    }


def _named_path_reaches(module: str, qualname: str, cls: type) -> bool:
    obj = sys.modules.get(module)
    if isinstance(obj, ModuleProxy):  # in-process (strict fcalls): the name leads to the gate
        return False
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None and part != "<locals>" else None
    return obj is cls


class RemoteObject:
    """Base of every proxy of a remote object: attribute access goes through the gate."""

    __slots__ = ("__weakref__", "_flexos_handle", "_flexos_link")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_flexos_"):
            raise AttributeError(name)
        return self._flexos_link.call(Op.GETATTR, self._flexos_handle, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_flexos_"):
            object.__setattr__(self, name, value)
        else:
            self._flexos_link.call(Op.SETATTR, self._flexos_handle, name, (value,))

    def __delattr__(self, name: str) -> None:
        self._flexos_link.call(Op.DELATTR, self._flexos_handle, name)

    def __repr__(self) -> str:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, "repr")

    def __dir__(self) -> list[str]:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, "dir")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a flexos proxy cannot be pickled: pass it through a gate instead")


class RemoteClass(type):
    """Metaclass of mirrored classes: instantiating one creates the object in its compartment.

    A class reachable by name survives a restart of its compartment: its first use after the
    restart looks it up again, which re-points this same local class at the new instance.
    """

    def _flexos_live(cls) -> tuple[Link, int]:
        link = cls._flexos_class_link
        if link.closed and link.rebind is not None and cls._flexos_by_name:
            link.rebind(cls.__module__, cls.__qualname__)
            link = cls._flexos_class_link
        return link, cls._flexos_class_handle

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        link, handle = cls._flexos_live()
        return link.call(Op.CALL, handle, None, args, kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") or name.startswith("_flexos_"):
            raise AttributeError(name)
        link, handle = cls._flexos_live()
        return link.call(Op.GETATTR, handle, name)

    def __repr__(cls) -> str:
        return f"<class '{cls.__module__}.{cls.__qualname__}' in compartment {cls._flexos_class_link.peer!r}>"


def _method(name: str) -> Any:
    def method(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        return self._flexos_link.call(Op.CALL_METHOD, self._flexos_handle, name, args, kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def _operator(wire: str) -> Any:
    def unary(self: RemoteObject) -> Any:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire)

    def binary(self: RemoteObject, other: Any) -> Any:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (other,))

    def setitem(self: RemoteObject, key: Any, value: Any) -> None:
        self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (key, value))

    def call(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        return self._flexos_link.call(Op.CALL, self._flexos_handle, None, args, kwargs)

    def exit(self: RemoteObject, exc_type: Any, exc: Any, tb: Any) -> Any:
        # Tracebacks hold frames: they stay on this side of the gate.
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (exc_type, exc, None))

    if wire == "call":
        return call
    if wire == "exit":
        return exit
    if wire == "setitem":
        return setitem
    if wire in ("getitem", "delitem", "contains", "eq", "ne", "lt", "le", "gt", "ge"):
        return binary
    return unary


_WIRE_TO_DUNDER = {wire: dunder for dunder, wire in DUNDERS.items()}


def mirror_class(link: Link, handle: int, desc: dict[str, Any], mirrors: dict) -> type:
    """The local mirror of a remote class, synthesized from its description.

    Classes reachable by name are kept in ``mirrors`` (one dict per compartment, across its
    restarts) and re-pointed rather than re-created, so identity, ``except`` and ``isinstance``
    hold across restarts.
    """
    key = (desc["module"], desc["qualname"]) if desc["by_name"] else None
    cls = mirrors.get(key) if key else None
    if cls is None:
        cls = _synthesize(desc)
        if key:
            mirrors[key] = cls
    type.__setattr__(cls, "_flexos_class_link", link)
    type.__setattr__(cls, "_flexos_class_handle", handle)
    return cls


def _synthesize(desc: dict[str, Any]) -> type:
    name, qualname, module, bases = desc["name"], desc["qualname"], desc["module"], desc["bases"]
    if desc["exception"]:  # a real exception class: its instances cross by value
        exc_bases = tuple(b for b in bases if isinstance(b, type) and issubclass(b, BaseException))
        namespace = {"__module__": module, "__qualname__": qualname}
        try:
            return type(name, exc_bases or (Exception,), namespace)
        except TypeError:
            return type(name, (Exception,), namespace)
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": module,
        "__qualname__": qualname,
        "_flexos_by_name": desc["by_name"],
    }
    for method in desc["methods"]:
        namespace[method] = _method(method)
    for wire in desc["dunders"]:
        namespace[_WIRE_TO_DUNDER[wire]] = _operator(wire)
    if desc["hash"] == "none":
        namespace["__hash__"] = None
    elif desc["hash"] == "remote":
        namespace["__hash__"] = _operator("hash")
    proxy_bases = tuple(b for b in bases if isinstance(b, RemoteClass)) or (RemoteObject,)
    try:
        return RemoteClass(name, proxy_bases, namespace)
    except TypeError:  # an MRO the mirror cannot reproduce: keep the behaviour, drop the bases
        return RemoteClass(name, (RemoteObject,), namespace)


def new_proxy(cls: type, link: Link, handle: int) -> RemoteObject:
    proxy = object.__new__(cls)
    object.__setattr__(proxy, "_flexos_link", link)
    object.__setattr__(proxy, "_flexos_handle", handle)
    return proxy


# -- modules --------------------------------------------------------------------------------------

# Module attributes the import system sets on every module; they stay local to the proxy.
_LOCAL_MODULE_ATTRS = frozenset(
    {"__name__", "__spec__", "__loader__", "__path__", "__file__", "__package__", "__cached__", "__all__"}
)


# Remote types whose instances a module proxy binds as by-name ModuleFunctions (a ModuleFunction:
# the app relaying to its own gate, which itself rebinds after a restart).
_FUNCTION_TYPES = frozenset({"function", "builtin_function_or_method", "cython_function_or_method", "ModuleFunction"})


class ModuleFunction:
    """A module-level function of another compartment, bound by name.

    It is looked up again in each new instance of the compartment, so a reference kept by the
    app (``from lib import f``) keeps working after the compartment restarts.
    """

    __slots__ = ("__dict__", "__weakref__", "_flexos_bound", "_flexos_module")

    def __init__(self, module: ModuleProxy, name: str) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = module.__name__
        self._flexos_module = module
        self._flexos_bound: RemoteObject | None = None  # the function in the current instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = self._flexos_bound
        if function is None or function._flexos_link.closed:  # first call, or a restart since
            function = self._flexos_bound = getattr(self._flexos_module._flexos_target(), self.__name__)
        return function._flexos_link.call(Op.CALL, function._flexos_handle, None, args, kwargs)

    def __repr__(self) -> str:
        where = self._flexos_module._flexos_compartment.name
        return f"<function {self.__module__}.{self.__name__} in compartment {where!r}>"


class ModuleProxy(types.ModuleType):
    """A module that lives in another compartment, as seen by this one (a gate in sys.modules).

    Functions, classes and submodules are bound on first use (functions are called by name, so
    they survive a restart of the compartment); data attributes are read from the compartment
    on every access.
    """

    def __init__(self, name: str, compartment: Any) -> None:
        super().__init__(name)
        types.ModuleType.__setattr__(self, "_flexos_compartment", compartment)

    def _flexos_target(self) -> Any:
        return self._flexos_compartment.module_object(self.__name__)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_flexos_") or name in _LOCAL_MODULE_ATTRS:
            raise AttributeError(name)
        value = getattr(self._flexos_target(), name)
        if isinstance(value, RemoteObject) and type(value).__name__ in _FUNCTION_TYPES:
            value = ModuleFunction(self, name)
        if isinstance(value, (type, types.ModuleType, ModuleFunction)):
            types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LOCAL_MODULE_ATTRS or isinstance(value, ModuleProxy):
            types.ModuleType.__setattr__(self, name, value)
        else:
            self.__dict__.pop(name, None)
            setattr(self._flexos_target(), name, value)

    def __dir__(self) -> list[str]:
        return dir(self._flexos_target())

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} in compartment {self._flexos_compartment.name!r}>"
