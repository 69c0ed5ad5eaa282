"""What a peer may reach through a gate: the capability policy (docs/security.md, "Capability policy").

The rule: a compartment reaches exactly the objects this side handed it and what their public
interface offers; holding a reference is the only way to reach anything. The app is the
principal: a compartment serves the app's requests as Python would (minus interpreter
internals), while the app, and a compartment serving a sibling, serve a *compartment's* requests
under this policy (a SES/LavaMoat-style membrane; RLBox's ``tainted<T>`` for what comes back):

- names: a dunder other than :data:`OPEN_DUNDERS` or a module's plain-data dunder
  (``yaml.__with_libyaml__``, ``__author__``) (``__globals__``, ``__dict__``, ``__class__``,
  ``__subclasses__``, ...) or an attribute of :data:`INTROSPECTION` (frames and code of
  generators, coroutines and tracebacks) is refused to everyone: from those, a compartment would
  walk from an object it was given to every object it was not. A compartment is also refused
  private names (``_x``, name-mangled ``_C__x``; but a named tuple's ``_asdict``, ``_fields``,
  ``_field_defaults``, and the ``_asdict`` protocol of any object) and ``mro`` (a class's bases, which it was not
  given);
- callbacks (functions, methods, builtins, ``functools.partial``) are call-only for a
  compartment: ``partial.func`` would be the wrapped function, callable with any argument;
- writes: a compartment never sets or deletes attributes of a class or a module (that would
  rewrite them for every user), nor a name the object's class defines as a method (an instance
  attribute would shadow it); it may write the public data attributes of an object it was given,
  through that object's own ``__setattr__`` (a frozen dataclass, a property without setter or
  ``__slots__`` still refuse);
- classes: one a compartment was *given* as a value is granted (it may call it); one it reached
  only as the type of an object, an exception's class or a base is described only
  (:class:`flexos.wire.codec.Described`): matched by ``isinstance`` and ``except``, never
  called or read.

Enforced elsewhere, and listed here so the policy reads in one place:

- operators: only those of the table :mod:`flexos.wire.operators` (the peer names a row,
  never a function);
- imports: only through the link's importer, which serves the modules the image places in this
  compartment (``Runtime.serve_import``); a link without one refuses every import;
- values (:mod:`flexos.wire.codec`): frames, code objects and tracebacks never cross; modules
  cross by name (the receiver's own module or gate, never the owner's object); only inert
  builtins (classes, ``NotImplemented``, ``Ellipsis``) and exception classes of unlisted modules
  resolve to the receiver's own objects by name; exceptions are rebuilt without running their
  class's code, and flexos's own exceptions from a compartment arrive as GateError;
- handles: a compartment holds at most :data:`flexos.gates.handles.MAX_HANDLES` of this side's
  objects, and handles of an encoding that failed are taken back.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any, NamedTuple

from flexos.errors import ProtocolError
from flexos.wire.codec import Described

# The dunder attributes a peer may read or write: descriptive, and leading nowhere else.
OPEN_DUNDERS = frozenset({"__name__", "__qualname__", "__doc__", "__module__", "__all__", "__version__", "__file__"})
# Attributes without dunder form that lead from an object to frames and their globals.
INTROSPECTION = frozenset(
    {
        "gi_frame",
        "gi_code",
        "gi_yieldfrom",
        "cr_frame",
        "cr_code",
        "cr_await",
        "cr_origin",
        "ag_frame",
        "ag_code",
        "ag_await",
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_back",
        "f_code",
        "tb_frame",
        "tb_next",
        "func_globals",
    }
)
# The documented API of named tuples, which a compartment may read on the app's: views of the
# fields it already holds by value (simplejson's ``namedtuple_as_object`` calls ``_asdict``).
NAMED_TUPLE_API = frozenset({"_asdict", "_fields", "_field_defaults"})
# ``_asdict`` is also a protocol any object may offer (simplejson serializes an object with an
# ``_asdict()`` as the mapping it answers, as it does with ``for_json()``): readable on any object,
# so that an object offering it is asked (its own ``__getattr__`` included), like ``__json__``.
AS_DICT = "_asdict"
# Public names a compartment is refused anyway: they lead from a class to classes it was not given.
CLASS_WALKS = frozenset({"mro"})
# Callbacks: a compartment may call them, and read nothing of them but OPEN_DUNDERS.
CALL_ONLY = frozenset(
    {
        types.FunctionType,
        types.BuiltinFunctionType,
        types.MethodType,
        types.MethodWrapperType,
        types.MethodDescriptorType,
        types.WrapperDescriptorType,
        types.ClassMethodDescriptorType,
        functools.partial,
    }
)


class Policy(NamedTuple):
    """How this side serves one peer's requests: which attribute names it may read (or call) and
    write on which objects; each check answers the name, or raises AttributeError."""

    readable: Callable[[Any, Any], str]
    writable: Callable[[Any, Any], str]
    private_methods: bool  # whether class descriptions list private methods


def _refused(name: str) -> AttributeError:
    if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
        return AttributeError(f"attribute {name!r} is private to the compartment that owns the object")
    return AttributeError(f"attribute {name!r} cannot be reached through a flexos gate")


# The types of the module-level dunder attributes a peer may read (yaml.__with_libyaml__,
# __author__): plain data, which leads nowhere (__builtins__, __loader__, __spec__ are not).
_PLAIN_DATA = frozenset({bool, int, float, str, type(None)})


def _plain_module_dunder(obj: Any, name: str) -> bool:
    """Whether ``name`` is a dunder data attribute of module ``obj`` that holds plain data."""
    return isinstance(obj, types.ModuleType) and type(obj.__dict__.get(name, obj)) in _PLAIN_DATA


def readable_by_app(obj: Any, name: Any) -> str:
    """``name`` if the app may reach that attribute: anything but interpreter internals."""
    if type(name) is not str:
        raise ProtocolError("attribute name must be a string")
    if (name.startswith("__") and name.endswith("__") and name not in OPEN_DUNDERS) or name in INTROSPECTION:
        if name in INTROSPECTION or not _plain_module_dunder(obj, name):
            raise _refused(name)
    return name


def readable_by_compartment(obj: Any, name: Any) -> str:
    """``name`` if a compartment may read or call that attribute of ``obj``: public ones only, and
    of a callback nothing but what describes it."""
    if type(name) is not str:
        raise ProtocolError("attribute name must be a string")
    if name.startswith("_"):
        if name not in OPEN_DUNDERS and not (
            (name[:2] == name[-2:] == "__" and _plain_module_dunder(obj, name))
            or name == AS_DICT
            or (name in NAMED_TUPLE_API and isinstance(obj, tuple) and hasattr(type(obj), "_fields"))
        ):
            raise _refused(name)
    elif name in INTROSPECTION or name in CLASS_WALKS:
        raise _refused(name)
    elif type(obj) in CALL_ONLY:
        raise AttributeError(f"a {type(obj).__name__} handed to a compartment can only be called")
    return name


def writable_by_compartment(obj: Any, name: Any) -> str:
    """``name`` if a compartment may set or delete that attribute of ``obj``: a public data
    attribute of an object (never of a class, module or callback, never shadowing a method)."""
    if type(name) is not str:
        raise ProtocolError("attribute name must be a string")
    if name.startswith("_") or name in INTROSPECTION:
        raise _refused(name)
    if isinstance(obj, (type, types.ModuleType, Described)) or type(obj) in CALL_ONLY:
        raise AttributeError(
            f"a compartment cannot change attribute {name!r} of a {type(obj).__name__}: classes, modules and "
            "callbacks are never written through a gate"
        )
    for base in type(obj).__mro__:
        if name in base.__dict__:
            defined = base.__dict__[name]
            if not hasattr(type(defined), "__set__") and (
                callable(defined) or isinstance(defined, (classmethod, staticmethod))
            ):
                raise AttributeError(
                    f"attribute {name!r} of a {type(obj).__name__} is a method of its class: a compartment cannot "
                    "shadow it"
                )
            break
    return name


# The app's requests, as Python allows; a compartment's, under the capability policy.
APP_POLICY = Policy(readable_by_app, readable_by_app, private_methods=True)
COMPARTMENT_POLICY = Policy(readable_by_compartment, writable_by_compartment, private_methods=False)


def always_replicated(module: str) -> bool:
    """Modules every compartment has its own identical copy of, whatever the image says: an
    exception class of theirs that a peer sends is this side's own class, not a mirror."""
    return module == "builtins" or module == "flexos" or module.startswith("flexos.")
