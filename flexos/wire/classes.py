"""Class descriptions: what the owner of a class tells a peer so that the peer can mirror it.

A DESCRIBE call answers with one msgpack map, with exactly these keys (in this order):

- ``name``, ``qualname``, ``module``: the class's ``__name__`` (an identifier, or identifiers
  joined by dots, as some classes are named), ``__qualname__``
  and ``__module__`` ("" if it has none);
- ``bases``: its bases other than ``object``, described only (:class:`~flexos.wire.codec.Described`:
  classes of the owner travel by reference, builtin ones by name);
- ``exception``: whether it derives from BaseException (its mirror is then a real local
  exception class, and its instances cross by value);
- ``methods``: the names of its plain methods (identifiers; none that start with ``__`` or
  ``_flexos``, and for a peer other than the app none that start with ``_``: it may not call
  them), which the mirror forwards as method calls;
- ``dunders``: the wire names of the operators it implements (of
  :data:`flexos.wire.operators.DESCRIBED`), in the table's order;
- ``value``: the builtin value type it derives from (``"str"``, ``"int"``, ``"float"``,
  ``"bytes"``, ``"tuple"``: :data:`flexos.wire.values.VALUE_BASES`; and from the app only,
  ``"dict"`` or ``"list"``: :data:`~flexos.wire.values.CONTAINER_BASES`), or ``""``. Instances of
  such a class cross as value proxies, and ``methods`` and ``dunders`` then list only what the
  class adds to or overrides of that base: the rest runs locally on the copied value;
- ``hash``: ``"none"`` (unhashable), ``"identity"`` (inherited: ``object.__hash__``, or the value
  base's own) or ``"remote"`` (its own ``__hash__``, applied by the owner);
- ``by_name``: whether the owner reaches it again as ``module.qualname`` (its mirror then
  survives a restart of the owner's compartment).

:func:`describe_class` builds one (the owner); :func:`checked_description` checks one received
from a peer before anything is built from it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal, TypedDict, cast

from flexos.errors import ProtocolError
from flexos.wire.codec import Described
from flexos.wire.operators import DESCRIBED, DESCRIBED_WIRES
from flexos.wire.values import PROXY_VALUE_BASES, container_base, value_base


class ClassDescription(TypedDict):
    name: str
    qualname: str
    module: str
    bases: list[Any]
    exception: bool
    methods: list[str]
    dunders: list[str]
    value: str
    hash: Literal["none", "identity", "remote"]
    by_name: bool


_KEYS = frozenset(ClassDescription.__annotations__)
_HASHING = frozenset({"none", "identity", "remote"})


def _lookup(cls: type, name: str) -> Any:
    """``name`` as instances of ``cls`` see it (the class's MRO, never its metaclass)."""
    for base in cls.__mro__:
        if name in base.__dict__:
            return base.__dict__[name]
    return None


def _overrides(cls: type, base: type, name: str) -> bool:
    """Whether ``cls`` defines ``name`` other than ``base`` (and ``object``) does."""
    mine = _lookup(cls, name)
    return mine is not None and mine is not _lookup(base, name) and mine is not object.__dict__.get(name)


def describe_class(
    cls: type, reaches: Callable[[str, str, type], bool], private: bool = True, containers: bool = False
) -> ClassDescription:
    """What a peer needs to mirror ``cls``; ``reaches(module, qualname, cls)`` says whether the
    owner finds ``cls`` again by that name; ``private``: list methods whose names start with ``_``;
    ``containers``: instances of a ``dict`` or ``list`` subclass cross as container copies (the
    app's, to a compartment)."""
    hidden = ("__", "_flexos") if private else ("_",)
    value = value_base(cls) or (container_base(cls) if containers else "")
    base = PROXY_VALUE_BASES[value][0] if value else object  # what the mirror inherits locally
    dunders = []
    for op in DESCRIBED:
        if any(_overrides(cls, base, dunder) for dunder in op.marks):
            dunders.append(op.wire)
    methods = []
    for name in dir(cls):
        if name.startswith(hidden):  # a peer refuses these (flexos's own machinery), or may not call them
            continue
        try:
            attr = inspect.getattr_static(cls, name)
        except AttributeError:
            continue
        if isinstance(attr, (staticmethod, classmethod, type, property)):
            continue
        if callable(attr) and hasattr(type(attr), "__get__") and (base is object or _overrides(cls, base, name)):
            methods.append(name)
    hash_method = _lookup(cls, "__hash__")
    hashing: Literal["none", "identity", "remote"]
    if hash_method is None:
        hashing = "none"
    elif hash_method is object.__hash__ or hash_method is _lookup(base, "__hash__"):
        hashing = "identity"
    else:
        hashing = "remote"
    module = getattr(cls, "__module__", None) or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    return {
        "name": cls.__name__,
        "qualname": qualname,
        "module": module,
        "bases": [Described(base) for base in cls.__bases__ if base is not object],
        "exception": issubclass(cls, BaseException),
        "methods": methods,
        "dunders": dunders,
        "value": value,
        "hash": hashing,
        "by_name": reaches(module, qualname, cls),
    }


def checked_description(desc: Any) -> ClassDescription:
    """``desc`` if it is a well-formed class description; ProtocolError otherwise."""
    if type(desc) is not dict or set(desc) != _KEYS:
        raise ProtocolError("malformed class description")
    for key in ("name", "qualname", "module"):
        if type(desc[key]) is not str:
            raise ProtocolError("malformed class description")
    if not all(part.isidentifier() for part in desc["name"].split(".")):  # pkg.Dotted names exist
        raise ProtocolError(f"class name {desc['name']!r} is not a dotted name")
    methods, dunders = desc["methods"], desc["dunders"]
    if type(methods) is not list or type(dunders) is not list or type(desc["bases"]) is not list:
        raise ProtocolError("malformed class description")
    for method in methods:
        if type(method) is not str or not method.isidentifier() or method.startswith(("__", "_flexos")):
            raise ProtocolError(f"refused method name {method!r} in class description")
    if not all(wire in DESCRIBED_WIRES for wire in dunders) or desc["hash"] not in _HASHING:
        raise ProtocolError("malformed class description")
    if type(desc["value"]) is not str or (desc["value"] and desc["value"] not in PROXY_VALUE_BASES):
        raise ProtocolError("malformed class description")
    if type(desc["exception"]) is not bool or type(desc["by_name"]) is not bool:
        raise ProtocolError("malformed class description")
    return cast(ClassDescription, desc)
