"""Proxies: what code in one compartment holds in place of another compartment's objects.

A remote class is mirrored by a local class synthesized from its description (methods, the dunder
protocols it implements, its bases), so that ``isinstance``, ``except``, ``len()``, ``with``,
iteration and method calls behave as without flexos. Exception classes are mirrored as real local
exception classes; their instances cross by value. Every other remote object is an instance of
its mirrored class holding a handle.
"""

from __future__ import annotations

import copy
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from flexos.errors import ProtocolError
from flexos.wire.classes import ClassDescription
from flexos.wire.frames import SUBCLASS_MEMBER_KINDS, Op
from flexos.wire.operators import BY_WIRE, Operator, Shape
from flexos.wire.values import MIRROR_BASES, PROXY_VALUE_BASES

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
        return _pickled_by_its_owner(self, protocol)


class RemoteValue:
    """Base of value proxies: a proxy of a remote object that is also a copy of its builtin value.

    Its mirror derives from the builtin too (``str`` for a ``Markup``, ``int`` for an ``IntEnum``
    member, ``tuple`` for a named tuple), and the instance holds the value: whatever the builtin
    does runs locally on it, and cannot go stale, since the value is immutable. What the class adds
    or overrides runs in the owner, as for any proxy. No ``__slots__`` (``int``, ``bytes`` and
    ``tuple`` subclasses refuse them): the handle, link and, for those three, the anchor through
    which the import table weakly references it
    (:meth:`~flexos.gates.handles.ImportTable.lookup_or_create_value`) live in the instance's
    ``__dict__``. One live proxy per handle, so ``lib.red() is lib.Color.RED``.
    """

    _flexos_handle: int
    _flexos_link: Link

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_flexos_"):
            raise AttributeError(name)
        return self._flexos_link.call(Op.GETATTR, self._flexos_handle, name)

    def __setattr__(self, name: str, value: Any) -> None:
        self._flexos_link.call(Op.SETATTR, self._flexos_handle, name, (value,))

    def __delattr__(self, name: str) -> None:
        self._flexos_link.call(Op.DELATTR, self._flexos_handle, name)

    def __repr__(self) -> str:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, "repr")

    def __copy__(self) -> Any:
        return self  # an immutable value: its copy is itself

    def __deepcopy__(self, memo: Any) -> Any:
        return self

    def __reduce_ex__(self, protocol: Any) -> Any:
        return _pickled_by_its_owner(self, protocol)


#: How :func:`unpickled_in` finds the app's link to a compartment by name, newest first (each
#: running Runtime of the app adds its own; a compartment's Runtime adds none).
LINK_FINDERS: list[Callable[[str], Link | None]] = []


def _pickled_by_its_owner(proxy: Any, protocol: Any) -> Any:
    """``__reduce_ex__`` of a compartment's object in the app (so ``pickle``, ``copy.copy`` and
    ``copy.deepcopy`` work): the compartment pickles its own object, and unpickling asks it to
    unpickle those bytes (:func:`unpickled_in`); the app never unpickles them. A compartment may
    not pickle the app's objects (their classes' own copy protocols excepted, as operators)."""
    link = proxy._flexos_link
    if link.peer_is_app:
        raise TypeError("a flexos proxy cannot be pickled: pass it through a gate instead")
    data = link.call(Op.OPERATOR, proxy._flexos_handle, "pickle", (protocol,))
    if type(data) is not bytes:
        raise ProtocolError(f"compartment {link.peer!r} answered a pickle request with a {type(data).__name__}")
    return (unpickled_in, (link.peer, data))


def unpickled_in(compartment: str, data: bytes) -> Any:
    """The object compartment ``compartment`` pickled as ``data``, unpickled there (its proxy here)."""
    for find in reversed(LINK_FINDERS):
        link = find(compartment)
        if link is not None:
            return link.call(Op.UNPICKLE, "", None, (data,))
    import pickle

    raise pickle.UnpicklingError(
        f"this pickle holds an object of compartment {compartment!r}, pickled there: load it where flexos runs "
        "that compartment (the app never unpickles a compartment's bytes itself)"
    )


def new_value_proxy(cls: type, link: Link, handle: int, value: Any) -> Any:
    """A value proxy of the peer's object ``handle``, holding ``value`` (built by the builtin
    itself: no code of the class's runs; a container's contents come with :func:`refill_container`)."""
    builtin: Any = type(value)
    proxy: Any = builtin.__new__(cls) if builtin is dict or builtin is list else builtin.__new__(cls, value)
    attrs = proxy.__dict__
    attrs["_flexos_link"] = link
    attrs["_flexos_handle"] = handle
    return proxy


def refill_container(proxy: Any, contents: dict[Any, Any] | list[Any]) -> None:
    """Make a container copy hold ``contents``, with the builtin's own methods (the class's
    overrides, which run in the app, are never called)."""
    if type(contents) is dict:
        dict.clear(proxy)
        dict.update(proxy, contents)
    else:
        list.__init__(proxy, contents)


def _copy_of_container(proxy: Any, memo: Any = None) -> Any:
    """``copy.copy`` (and ``deepcopy``) of a container copy: a plain builtin copy of what it holds
    (the class's own copy protocol would run in the app and give back the app's object)."""
    builtin = type(proxy)._flexos_value
    plain = builtin.copy(proxy)
    return plain if memo is None else copy.deepcopy(plain, memo)


class RemoteClass(type):
    """Metaclass of mirrored classes: instantiating one creates the object in its compartment.

    A class reachable by name survives a restart of its compartment: its first use after the
    restart looks it up again, which re-points this same local class at the new instance.
    """

    # Set on each mirror by mirror_class (and its body), never on the metaclass itself.
    _flexos_class_link: Link
    _flexos_class_handle: int
    _flexos_by_name: bool

    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> RemoteClass:
        if "_flexos_by_name" in namespace:  # a mirror, synthesized from its description
            return super().__new__(mcls, name, bases, namespace)
        return _app_subclass(mcls, name, bases, namespace, kwargs)

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


def _method(name: str, owner: list[type]) -> Any:
    """A mirror's method ``name``; ``owner`` holds the mirror once it is made. Called as
    ``Base.name(self, ...)`` on an instance whose class has a ``name`` of its own (an app's
    subclass overriding it, or a subclass's mirror), it runs ``Base``'s own implementation, as
    without a gate, rather than dispatching on the instance again (which recursed)."""

    def method(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        if getattr(type(self), name, None) is not method:
            return self._flexos_link.call(Op.SUPER, self._flexos_handle, name, (owner[0], *args), kwargs)
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


def _optional(wire: str) -> Callable[..., Any]:
    def optional(self: RemoteObject, *args: Any) -> Any:
        return self._flexos_link.call(Op.OPERATOR, self._flexos_handle, wire, args)

    return optional


async def _awaiting(proxy: RemoteObject, wire: str, args: tuple[Any, ...]) -> Any:
    """Await the owner's running of an awaitable it owns: the call waits in an executor thread,
    so this event loop goes on meanwhile (callbacks the owner makes run on that thread, as for a
    synchronous call). Holds ``proxy``: the owner keeps the object until the await is over."""
    import asyncio
    import functools

    call = functools.partial(proxy._flexos_link.call, Op.OPERATOR, proxy._flexos_handle, wire, args)
    return await asyncio.get_running_loop().run_in_executor(None, call)


def _async(wire: str) -> Callable[..., Any]:
    if wire == "await":  # __await__ answers an iterator, the others an awaitable

        def await_(self: RemoteObject) -> Any:
            return _awaiting(self, wire, ()).__await__()

        return await_

    def awaitable(self: RemoteObject) -> Any:
        return _awaiting(self, wire, ())

    return awaitable


def _async_exit(wire: str) -> Callable[..., Any]:
    def aexit(self: RemoteObject, exc_type: Any, exc: Any, tb: Any) -> Any:
        return _awaiting(self, wire, (exc_type, exc, None))

    return aexit


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
    Shape.OPTIONAL: _optional,
    Shape.ASYNC: _async,
    Shape.ASYNC_EXIT: _async_exit,
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
        cls = _synthesize(desc, link.peer_is_app)
        if key:
            mirrors[key] = cls
    type.__setattr__(cls, "_flexos_class_link", link)
    type.__setattr__(cls, "_flexos_class_handle", handle)
    return cls


def _synthesize(desc: ClassDescription, peer_is_app: bool) -> type:
    """``peer_is_app``: the class is the app's (mirrored in a compartment)."""
    name, qualname, module, bases = desc["name"], desc["qualname"], desc["module"], desc["bases"]
    if desc["exception"]:  # a real exception class: its instances cross by value
        exc_bases = tuple(b for b in bases if isinstance(b, type) and issubclass(b, BaseException))
        exc_namespace = {"__module__": module, "__qualname__": qualname, "__str__": _exception_text}
        try:
            return type(name, exc_bases or (Exception,), exc_namespace)
        except TypeError:
            return type(name, (Exception,), exc_namespace)
    namespace: dict[str, Any] = {
        "__slots__": (),
        "__module__": module,
        "__qualname__": qualname,
        "_flexos_by_name": desc["by_name"],
        "_flexos_methods": tuple(desc["methods"]),
    }
    owner: list[type] = []
    for method in desc["methods"]:
        namespace[method] = _method(method, owner)
    for wire in desc["dunders"]:
        if wire == "reduce_ex" and not peer_is_app:
            continue  # the app pickles a compartment's object in its owner (RemoteObject.__reduce_ex__)
        op = BY_WIRE[wire]
        namespace[op.dunder] = _operator(op)
    if module == "builtins" and qualname == "function":  # a function binds as a method, as it does here
        namespace["__get__"] = _bind
    if desc["hash"] == "none":
        namespace["__hash__"] = None
    elif desc["hash"] == "remote":
        namespace["__hash__"] = _operator(BY_WIRE["hash"])
    if desc["value"]:  # a value proxy: the builtin base, and mirrored bases that are value proxies too
        builtin = PROXY_VALUE_BASES[desc["value"]][0]
        namespace["_flexos_value"] = builtin
        if builtin is dict or builtin is list:
            namespace["__copy__"] = namespace["__deepcopy__"] = _copy_of_container
        plain: tuple[type, ...] = (RemoteValue, builtin)
        proxy_bases = tuple(b for b in bases if isinstance(b, RemoteClass) and issubclass(b, builtin)) or plain
    else:
        plain = (RemoteObject,)
        mirrored = tuple(b for b in bases if isinstance(b, RemoteClass) and issubclass(b, RemoteObject))
        kept = tuple(b for b in bases if b in MIRROR_BASES)
        proxy_bases = (mirrored or plain) + kept
    try:
        cls = RemoteClass(name, proxy_bases, namespace)
    except TypeError:  # an MRO the mirror cannot reproduce: keep the behaviour, drop the bases
        cls = RemoteClass(name, plain, namespace)
    if not desc["value"]:  # never run by instantiation: only as ``Base.__init__(self, ...)``
        type.__setattr__(cls, "__init__", _super_method(cls, "__init__"))
    owner.append(cls)
    return cls


def _bind(function: Any, obj: Any, owner: Any = None) -> Any:
    """``__get__`` of a function's proxy: a method bound to ``obj`` (on a class: the function)."""
    return function if obj is None else types.MethodType(function, obj)


def _exception_text(exc: BaseException) -> str:
    """``str()`` of a mirrored exception: the text its class gave it in its compartment."""
    text = exc.__dict__.get("_flexos_text")
    return text if type(text) is str else BaseException.__str__(exc)


# -- app subclasses of mirrored classes -------------------------------------------------------------

# What a class statement puts in a namespace that is no member to forward.
_CLASS_MACHINERY = frozenset(
    {
        "__module__",
        "__qualname__",
        "__doc__",
        "__dict__",
        "__weakref__",
        "__slots__",
        "__firstlineno__",
        "__static_attributes__",
        "__classcell__",
        "__orig_bases__",
        "__init_subclass__",
        "__class_getitem__",
        "__new__",
        "__parameters__",
    }
)


def _app_subclass(
    mcls: type, name: str, bases: tuple[type, ...], namespace: dict[str, Any], kwargs: dict[str, Any]
) -> Any:
    """A class the app derives from mirrored classes (``class UpperLoader(yaml.SafeLoader)``).

    The owner of the bases makes a real subclass of its classes whose members forward to the
    app's (:func:`build_subclass`), so that the library, calling ``self.construct_scalar(...)``
    on an instance, runs the app's override; this local class stands for it (its instances are
    proxies of the owner's instances, and it is what the owner's class crosses back as). In the
    app, each mirrored base is replaced by its :func:`_super_view`, so that ``super().name()``
    runs the base's method, not the override again.
    """
    mirrored = [base for base in bases if isinstance(base, RemoteClass)]
    links = {base._flexos_class_link for base in mirrored}
    if len(links) != 1:
        raise TypeError(f"class {name!r} derives from classes of more than one compartment")
    link = links.pop()
    local_bases = tuple(
        _super_view(base) if isinstance(base, RemoteClass) and "_flexos_by_name" in base.__dict__ else base
        for base in bases
    )
    cls: Any = type.__new__(mcls, name, local_bases, namespace, **kwargs)
    members = []
    for attr, value in _own_members(cls).items():
        if attr in _CLASS_MACHINERY or attr.startswith("_flexos_"):
            continue
        if isinstance(value, types.FunctionType):
            members.append(["method", attr, value])
        elif isinstance(value, (classmethod, staticmethod)):
            members.append([type(value).__name__, attr, value.__func__])
        elif isinstance(value, property):
            members.append(["property", attr, [value.fget, value.fset, value.fdel]])
        elif not (attr.startswith("__") and attr.endswith("__")) and not hasattr(type(value), "__get__"):
            members.append(["value", attr, value])  # (other descriptors, slots among them, stay the app's)
            if attr in cls.__dict__:
                type.__delattr__(cls, attr)  # read from the owner's class from now on: one copy
    handle = link.call(
        Op.SUBCLASS, mirrored[0]._flexos_class_handle, name, [cls.__qualname__, cls.__module__, mirrored, members]
    )
    type.__setattr__(cls, "_flexos_class_link", link)
    type.__setattr__(cls, "_flexos_class_handle", handle)
    type.__setattr__(cls, "_flexos_by_name", False)
    link.adopt_class(handle, cls)
    return cls


def _own_members(cls: type) -> dict[str, Any]:
    """The members the app's classes in ``cls``'s MRO define (mixins included), the nearest first;
    not those of a mirrored base or an app's subclass of one and what they derive from, which the
    owner's class already has (``class Mine(CanonicalLoader)``, itself an app's subclass of
    PyYAML's classes with mixins, keeps ``CanonicalLoader.__init__``, not a mixin's)."""
    served = {klass for base in cls.__mro__[1:] if isinstance(base, RemoteClass) for klass in base.__mro__}
    members: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass not in served and klass is not object and "_flexos_view" not in klass.__dict__:
            members.update(klass.__dict__)
    return members


def _super_view(mirror: RemoteClass) -> type:
    """``mirror`` as a base of an app's class: a subclass whose methods (and ``__init__``) run the
    mirrored class's own implementation on the instance (a SUPER call), whatever the instance's
    class overrides: what ``super()`` means."""
    view = mirror.__dict__.get("_flexos_super_view")
    if view is None:
        namespace: dict[str, Any] = {
            "__slots__": (),
            "__module__": mirror.__module__,
            "__qualname__": mirror.__qualname__,
            "_flexos_view": True,
        }
        methods = {name for klass in mirror.__mro__ for name in klass.__dict__.get("_flexos_methods", ())}
        for method in (*methods, "__init__"):
            namespace[method] = _super_method(mirror, method)
        view = type.__new__(RemoteClass, mirror.__name__, (mirror,), namespace)
        type.__setattr__(mirror, "_flexos_super_view", view)
    return view


def _super_method(base: RemoteClass, name: str) -> Callable[..., Any]:
    def method(self: RemoteObject, *args: Any, **kwargs: Any) -> Any:
        return self._flexos_link.call(Op.SUPER, self._flexos_handle, name, (base, *args), kwargs)

    method.__name__ = method.__qualname__ = name
    return method


def build_subclass(name: Any, qualname: Any, module: Any, bases: Any, members: Any) -> type:
    """The owner's side of an app's subclass: a real subclass of ``bases`` (its own classes) whose
    methods, class and static methods and properties forward to the app's functions."""
    if not all(type(text) is str for text in (name, qualname, module)) or not name.isidentifier():
        raise ProtocolError("malformed subclass request")
    if (
        type(bases) is not list
        or not bases
        or not all(isinstance(b, type) and not isinstance(b, RemoteClass) for b in bases)
    ):
        raise TypeError("a class can only derive from classes of the compartment that owns them")
    if type(members) is not list:
        raise ProtocolError("malformed subclass request")
    namespace: dict[str, Any] = {"__module__": module, "__qualname__": qualname, "_flexos_app_subclass": True}
    for member in members:
        if (
            type(member) is not list
            or len(member) != 3
            or member[0] not in SUBCLASS_MEMBER_KINDS
            or type(member[1]) is not str
        ):
            raise ProtocolError("malformed subclass member")
        kind, attr, value = member
        if kind == "method":
            namespace[attr] = _forwarder(value, attr, qualname)
        elif kind == "classmethod":
            namespace[attr] = classmethod(_forwarder(value, attr, qualname))
        elif kind == "staticmethod":
            namespace[attr] = staticmethod(_forwarder(value, attr, qualname))
        elif kind == "property":
            if type(value) is not list or len(value) != 3:
                raise ProtocolError("malformed subclass property")
            fget, fset, fdel = (None if f is None else _forwarder(f, attr, qualname) for f in value)
            namespace[attr] = property(fget, fset, fdel)
        else:
            namespace[attr] = value
    return types.new_class(name, tuple(bases), exec_body=lambda body: body.update(namespace))


def _forwarder(function: Any, name: str, qualname: str) -> Callable[..., Any]:
    """A plain function (so that it binds as a method) that calls the app's ``function``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    forward.__name__ = name
    forward.__qualname__ = f"{qualname}.{name}"
    return forward


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
_OP_CALL = Op.CALL  # read on every call of a module function


class ModuleFunction:
    """A module-level function of another compartment, bound by name.

    It is looked up again in each new instance of the compartment, so a reference kept by the
    app (``from lib import f``) keeps working after the compartment restarts.
    """

    __slots__ = ("__dict__", "__weakref__", "_flexos_bound", "_flexos_module")

    def __init__(self, module: ModuleProxy, name: str, function: RemoteObject) -> None:
        self.__name__ = self.__qualname__ = name
        self.__module__ = module.__name__
        self._flexos_module = module
        # The function in the current instance, the one read (``orig = m.f; m.f = wrapper``
        # keeps calling the original); looked up by name again only after a restart.
        self._flexos_bound = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = self._flexos_bound
        if function._flexos_link.closed:  # a restart since
            found = getattr(self._flexos_module._flexos_target(), self.__name__)
            if not isinstance(found, RemoteObject):  # the app's own function, set on the module
                return found(*args, **kwargs)
            function = self._flexos_bound = found
        return function._flexos_link.call(_OP_CALL, function._flexos_handle, None, args, kwargs)

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        """Bind as a method, as a function does (a library's function set on an app class)."""
        return self if obj is None else types.MethodType(self, obj)

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
        # ``__file__``, unless the import set one here: the module's own (a test finds its data by it).
        if name.startswith("_flexos_") or (name in _LOCAL_MODULE_ATTRS and name != "__file__"):
            raise AttributeError(name)
        value = getattr(self._flexos_target(), name)
        if isinstance(value, RemoteObject) and type(value).__name__ in _FUNCTION_TYPES:
            known = value._flexos_link.module_functions
            wrapper = known.get(value._flexos_handle)
            if wrapper is None or wrapper._flexos_bound is not value:  # (rebound after a restart)
                wrapper = known[value._flexos_handle] = ModuleFunction(self, name, value)
            value = wrapper
        if isinstance(value, (type, types.ModuleType, ModuleFunction)):
            types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LOCAL_MODULE_ATTRS or isinstance(value, ModuleProxy):
            types.ModuleType.__setattr__(self, name, value)
        else:
            self.__dict__.pop(name, None)
            setattr(self._flexos_target(), name, value)

    def __delattr__(self, name: str) -> None:
        """Forwarded, like assignment (``mock.patch`` undoes a patch by deleting what it set)."""
        bound = self.__dict__.pop(name, None)
        if name in _LOCAL_MODULE_ATTRS or isinstance(bound, ModuleProxy):
            if bound is None:
                raise AttributeError(name)
            return
        delattr(self._flexos_target(), name)

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
