"""Stdlib value types that cross by value, and the stdlib classes that cross by name.

A fixed table, like the operator table: a VALUE extension names a row and carries the value's
documented state (the arguments its constructor takes), and the receiver builds the value with
*its own* stdlib class from that state. The peer chooses a row, never a class or a function, and
what a row builds runs only stdlib code on checked plain data: nothing is unpickled, and no code
of the peer's runs. Each row is an immutable type (or, like ``OrderedDict``, a container copied
as ``dict`` is), exactly that type: a subclass crosses as its owner's object.

``datetime`` and ``time`` carry their ``tzinfo`` as a value of its own: a ``timezone`` by value,
any other ``tzinfo`` (dateutil's zones) by reference, as a proxy whose mirror keeps
``datetime.tzinfo`` as a base (:data:`MIRROR_BASES`), so that the receiver's ``datetime``
constructor accepts it and asks the owner for offsets only when it needs them.

:data:`CLASSES_BY_NAME` adds these classes, and ``tzinfo``, to the builtin classes that cross by
name (a BUILTIN extension): ``type(d) is datetime.date`` holds on both sides.
"""

from __future__ import annotations

import collections
import datetime
import decimal
from collections.abc import Callable
from typing import Any, NamedTuple


class ValueType(NamedTuple):
    wire: str  # the row's name in VALUE extensions
    cls: type
    state: Callable[[Any], list[Any]]  # the owner: the value's constructor arguments
    build: Callable[[Any], Any]  # the receiver: the value (ValueError/TypeError on a bad state)


def _ints(state: Any, count: int) -> list[int]:
    if type(state) is not list or len(state) != count or not all(type(item) is int for item in state):
        raise ValueError("malformed value state")
    return state


def _build_date(state: Any) -> datetime.date:
    return datetime.date(*_ints(state, 3))


def _build_time(state: Any) -> datetime.time:
    if type(state) is not list or len(state) != 6:
        raise ValueError("malformed time")
    *fields, tzinfo, fold = state
    hour, minute, second, microsecond = _ints(fields, 4)
    return datetime.time(hour, minute, second, microsecond, tzinfo=tzinfo, fold=_ints([fold], 1)[0])


def _build_datetime(state: Any) -> datetime.datetime:
    if type(state) is not list or len(state) != 9:
        raise ValueError("malformed datetime")
    *fields, tzinfo, fold = state
    year, month, day, hour, minute, second, microsecond = _ints(fields, 7)
    return datetime.datetime(
        year, month, day, hour, minute, second, microsecond, tzinfo=tzinfo, fold=_ints([fold], 1)[0]
    )


def _build_timedelta(state: Any) -> datetime.timedelta:
    days, seconds, microseconds = _ints(state, 3)
    return datetime.timedelta(days, seconds, microseconds)


def _build_timezone(state: Any) -> datetime.timezone:
    if type(state) is not list or len(state) not in (1, 2) or type(state[0]) is not datetime.timedelta:
        raise ValueError("malformed timezone")
    if len(state) == 2 and type(state[1]) is not str:
        raise ValueError("malformed timezone")
    return datetime.timezone(*state)


def _build_decimal(state: Any) -> decimal.Decimal:
    if type(state) is not list or len(state) != 1 or type(state[0]) is not str:
        raise ValueError("malformed Decimal")
    try:
        return decimal.Decimal(state[0])
    except ArithmeticError:  # decimal.InvalidOperation: not a number's text
        raise ValueError("malformed Decimal") from None


def _build_slice(state: Any) -> slice:
    if type(state) is not list or len(state) != 3:
        raise ValueError("malformed slice")
    return slice(*state)  # its bounds crossed by their own rules; a slice runs no code of theirs


def _build_range(state: Any) -> range:
    start, stop, step = _ints(state, 3)
    return range(start, stop, step)


def _build_ordered_dict(state: Any) -> collections.OrderedDict[Any, Any]:
    if type(state) is not list or not all(type(pair) is list and len(pair) == 2 for pair in state):
        raise ValueError("malformed OrderedDict")
    return collections.OrderedDict(state)


VALUE_TYPES: tuple[ValueType, ...] = (
    ValueType("Decimal", decimal.Decimal, lambda d: [str(d)], _build_decimal),
    ValueType("date", datetime.date, lambda d: [d.year, d.month, d.day], _build_date),
    ValueType(
        "time",
        datetime.time,
        lambda t: [t.hour, t.minute, t.second, t.microsecond, t.tzinfo, t.fold],
        _build_time,
    ),
    ValueType(
        "datetime",
        datetime.datetime,
        lambda d: [d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, d.tzinfo, d.fold],
        _build_datetime,
    ),
    ValueType("timedelta", datetime.timedelta, lambda d: [d.days, d.seconds, d.microseconds], _build_timedelta),
    ValueType("timezone", datetime.timezone, lambda tz: list(tz.__getinitargs__()), _build_timezone),
    ValueType("slice", slice, lambda s: [s.start, s.stop, s.step], _build_slice),
    ValueType("range", range, lambda r: [r.start, r.stop, r.step], _build_range),
    ValueType("OrderedDict", collections.OrderedDict, lambda d: [[k, v] for k, v in d.items()], _build_ordered_dict),
)
BY_WIRE: dict[str, ValueType] = {row.wire: row for row in VALUE_TYPES}
BY_CLASS: dict[type, ValueType] = {row.cls: row for row in VALUE_TYPES}

# Stdlib abstract bases a mirror keeps: they hold no instance state and give the proxy the type
# that stdlib constructors check (``datetime(..., tzinfo=proxy)``).
MIRROR_BASES: frozenset[type] = frozenset({datetime.tzinfo})

# Stdlib classes that cross by name, like builtin classes: the receiver's own (calling one runs
# only stdlib code).
CLASSES_BY_NAME: dict[str, type] = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in (*BY_CLASS, *MIRROR_BASES)}
NAMES_OF_CLASSES: dict[type, str] = {cls: name for name, cls in CLASSES_BY_NAME.items()}

# Builtin immutable types whose subclasses' instances cross as *value proxies*: a copy of the
# builtin value (so ``isinstance(markup, str)``, ``len``, slicing and C code reading it work
# locally, and never go stale: the value cannot change) that is also a proxy of the owner's
# object (so the methods and operators its class adds run in the owner). Each with how to take
# the exact builtin value out of an instance without running the subclass's overrides.
VALUE_BASES: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "str": (str, str.__str__),
    "int": (int, int.__int__),
    "float": (float, float.__float__),
    "bytes": (bytes, bytes.__bytes__),
    "tuple": (tuple, lambda t: tuple.__getitem__(t, slice(None))),
}
VALUE_BASE_CLASSES: tuple[type, ...] = tuple(base for base, _ in VALUE_BASES.values())


# Mutable builtins whose subclasses' instances, the app's only, cross to a compartment as
# *container copies*: a value proxy whose builtin value is a copy of the contents (taken with the
# builtin's own ``copy``, so no code of the class runs), made again each time the object crosses,
# so that ``isinstance(d, dict)`` and C code that reads a dict or list (simplejson's encoder) work
# on it. What the class adds or overrides runs in the app; the builtin's own methods run on the
# copy, as they do on a plain ``dict`` or ``list`` argument, which crosses as a copy.
CONTAINER_BASES: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "dict": (dict, dict.copy),
    "list": (list, list.copy),
}
CONTAINER_BASE_CLASSES: tuple[type, ...] = (dict, list)
#: Every builtin a value proxy may derive from.
PROXY_VALUE_BASES: dict[str, tuple[type, Callable[[Any], Any]]] = {**VALUE_BASES, **CONTAINER_BASES}


def container_base(cls: type) -> str:
    """The wire name of the mutable builtin ``cls`` derives from ("" if none)."""
    for name, (base, _) in CONTAINER_BASES.items():
        if issubclass(cls, base):
            return name
    return ""


def value_base(cls: type) -> str:
    """The wire name of the builtin value type ``cls`` derives from ("" if none)."""
    for name, (base, _) in VALUE_BASES.items():
        if issubclass(cls, base):
            return name
    return ""
