"""Proxies: what code in one compartment holds in place of another compartment's objects.

A remote class is mirrored by a local class synthesized from its description (methods, the dunder
protocols it implements, its bases), so that ``isinstance``, ``except``, ``len()``, ``with``,
iteration and method calls behave as without flexos. Exception classes are mirrored as real local
exception classes; their instances cross by value. Every other remote object is an instance of
its mirrored class holding a handle.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from flexos.wire.classes import ClassDescription
from flexos.wire.frames import Op
from flexos.wire.operators import BY_WIRE, Operator, Shape

if TYPE_CHECKING:
    from flexos.gates.link import Link

# Mirrors of classes reachable by name, by (module, qualname): kept across restarts of their owner.
Mirrors = dict[tuple[str, str], type]


class RemoteObject:
    """Base of every proxy of a remote object: attribute access goes through the gate."""

    __slots__ = ("__weakref__", "_flexos_handle", "_flexos_link")
    _flexos_handle: int  # the peer's handle of the object
    _flexos_link: Link  # the link to the peer that owns it

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

    # Set on each mirror by mirror_class (and its body), never on the metaclass itself.
    _flexos_class_link: Link
    _flexos_class_handle: int
    _flexos_by_name: bool

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


def _unary(wire: str) -> Callable[..., Any]:
    def unary(self: RemoteObject) -> Any:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire)

    return unary


def _binary(wire: str) -> Callable[..., Any]:
    def binary(self: RemoteObject, other: Any) -> Any:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (other,))

    return binary


def _setitem(wire: str) -> Callable[..., Any]:
    def setitem(self: RemoteObject, key: Any, value: Any) -> None:
        self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (key, value))

    return setitem


def _call(wire: str) -> Callable[..., Any]:
    def call(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        return self._flexos_link.call(Op.CALL, self._flexos_handle, None, args, kwargs)

    return call


def _exit(wire: str) -> Callable[..., Any]:
    def exit(self: RemoteObject, exc_type: Any, exc: Any, tb: Any) -> Any:
        # Tracebacks hold frames: they stay on this side of the gate.
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, (exc_type, exc, None))

    return exit


# The proxy method of each operator shape, made for one wire name.
_SHAPED: dict[Shape, Callable[[str], Callable[..., Any]]] = {
    Shape.UNARY: _unary,
    Shape.BINARY: _binary,
    Shape.SETITEM: _setitem,
    Shape.CALL: _call,
    Shape.EXIT: _exit,
}


def _operator(op: Operator) -> Callable[..., Any]:
    """The proxy method for operator ``op``, shaped as its row of the table says."""
    return _SHAPED[op.shape](op.wire)


def mirror_class(link: Link, handle: int, desc: ClassDescription, mirrors: Mirrors) -> type:
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


def _synthesize(desc: ClassDescription) -> type:
    name, qualname, module, bases = desc["name"], desc["qualname"], desc["module"], desc["bases"]
    if desc["exception"]:  # a real exception class: its instances cross by value
        exc_bases = tuple(b for b in bases if isinstance(b, type) and issubclass(b, BaseException))
        exc_namespace = {"__module__": module, "__qualname__": qualname}
        try:
            return type(name, exc_bases or (Exception,), exc_namespace)
        except TypeError:
            return type(name, (Exception,), exc_namespace)
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": module,
        "__qualname__": qualname,
        "_flexos_by_name": desc["by_name"],
    }
    for method in desc["methods"]:
        namespace[method] = _method(method)
    for wire in desc["dunders"]:
        op = BY_WIRE[wire]
        namespace[op.dunder] = _operator(op)
    if desc["hash"] == "none":
        namespace["__hash__"] = None
    elif desc["hash"] == "remote":
        namespace["__hash__"] = _operator(BY_WIRE["hash"])
    proxy_bases = tuple(b for b in bases if isinstance(b, RemoteClass)) or (RemoteObject,)
    try:
        return RemoteClass(name, proxy_bases, namespace)
    except TypeError:  # an MRO the mirror cannot reproduce: keep the behaviour, drop the bases
        return RemoteClass(name, (RemoteObject,), namespace)


def new_proxy(cls: type[RemoteObject], link: Link, handle: int) -> RemoteObject:
    proxy = object.__new__(cls)
    object.__setattr__(proxy, "_flexos_link", link)
    object.__setattr__(proxy, "_flexos_handle", handle)
    return proxy


# -- modules --------------------------------------------------------------------------------------


class ModuleOwner(Protocol):
    """What module gates need of the compartment their modules live in (the runtime's handle)."""

    name: str

    @property
    def direct(self) -> bool:
        """Its modules are imported here without gates (plain fcalls)."""

    def import_module(self, name: str) -> tuple[bool, list[str]]:
        """Import ``name`` there: whether it is a package, and the names ``import *`` binds."""

    def module_object(self, name: str) -> Any:
        """The proxy of module ``name`` in its current instance (importing it again after a restart)."""


# Module attributes the import system sets on every module; they stay local to the proxy.
_LOCAL_MODULE_ATTRS = frozenset(
    {"__name__", "__spec__", "__loader__", "__path__", "__file__", "__package__", "__cached__", "__all__"}
)


# Remote types whose instances a module proxy binds as by-name ModuleFunctions (a ModuleFunction
# too: the app relaying to its own gate, which itself rebinds after a restart).
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

    _flexos_compartment: ModuleOwner

    def __init__(self, name: str, compartment: ModuleOwner) -> None:
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


def reachable_by_name(module: str, qualname: str, cls: type) -> bool:
    """Whether ``module.qualname`` leads to ``cls`` in this compartment (never through a gate)."""
    obj: Any = sys.modules.get(module)
    if isinstance(obj, ModuleProxy):  # in-process (strict fcalls): the name leads to the gate
        return False
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None and part != "<locals>" else None
    return obj is cls
