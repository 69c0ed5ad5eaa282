"""The operator table: every special method a proxy forwards, in one place.

A proxy class defines a dunder (``__len__``, ``__getitem__``, ``__exit__``, ...) for each operator
its remote class implements; calling it sends an OPERATOR call naming the operator's *wire name*,
and the owner applies the function of that row to its object. The peer chooses a row, never a
function: a wire name outside this table is refused, and so is a class description listing one.

Each row says:

- ``wire``: the name in OPERATOR calls and in class descriptions' ``dunders``;
- ``dunder``: the special method the proxy defines for it;
- ``shape``: the proxy method's parameters, and so what crosses (:class:`Shape`);
- ``function``: what the owner applies (None: the proxy sends another op, as ``call`` sends CALL);
- ``described``: listed in a class description when the class defines the dunder. Not so for
  ``repr`` and ``dir`` (every proxy has them) and ``hash`` (the description's ``hash`` key).

Adding an operator is adding one row.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable
from typing import Any, NamedTuple


class Shape(enum.Enum):
    """How a proxy's operator method is shaped, and what it sends."""

    UNARY = "unary"  # (self): no arguments
    BINARY = "binary"  # (self, other): one argument
    SETITEM = "setitem"  # (self, key, value): two arguments
    CALL = "call"  # (self, *args, **kwargs): a CALL op, not an OPERATOR
    EXIT = "exit"  # (self, exc_type, exc, tb): the traceback stays behind (it holds frames)


def _enter(obj: Any) -> Any:
    return type(obj).__enter__(obj)


def _exit(obj: Any, *args: Any) -> Any:
    return type(obj).__exit__(obj, *args)


class Operator(NamedTuple):
    wire: str
    dunder: str
    shape: Shape
    function: Callable[..., Any] | None
    described: bool = True


# In the order class descriptions list them.
OPERATORS: tuple[Operator, ...] = (
    Operator("len", "__len__", Shape.UNARY, len),
    Operator("iter", "__iter__", Shape.UNARY, iter),
    Operator("next", "__next__", Shape.UNARY, next),
    Operator("bool", "__bool__", Shape.UNARY, bool),
    Operator("getitem", "__getitem__", Shape.BINARY, operator.getitem),
    Operator("setitem", "__setitem__", Shape.SETITEM, operator.setitem),
    Operator("delitem", "__delitem__", Shape.BINARY, operator.delitem),
    Operator("contains", "__contains__", Shape.BINARY, operator.contains),
    Operator("call", "__call__", Shape.CALL, None),
    Operator("enter", "__enter__", Shape.UNARY, _enter),
    Operator("exit", "__exit__", Shape.EXIT, _exit),
    Operator("eq", "__eq__", Shape.BINARY, operator.eq),
    Operator("ne", "__ne__", Shape.BINARY, operator.ne),
    Operator("lt", "__lt__", Shape.BINARY, operator.lt),
    Operator("le", "__le__", Shape.BINARY, operator.le),
    Operator("gt", "__gt__", Shape.BINARY, operator.gt),
    Operator("ge", "__ge__", Shape.BINARY, operator.ge),
    Operator("str", "__str__", Shape.UNARY, str),
    Operator("int", "__int__", Shape.UNARY, int),
    Operator("float", "__float__", Shape.UNARY, float),
    Operator("index", "__index__", Shape.UNARY, operator.index),
    Operator("repr", "__repr__", Shape.UNARY, repr, described=False),
    Operator("dir", "__dir__", Shape.UNARY, dir, described=False),
    Operator("hash", "__hash__", Shape.UNARY, hash, described=False),
)

# Derived views of the table.
BY_WIRE: dict[str, Operator] = {op.wire: op for op in OPERATORS}
# What the owner applies for an OPERATOR call, by wire name.
FUNCTIONS: dict[str, Callable[..., Any]] = {op.wire: op.function for op in OPERATORS if op.function is not None}
# The operators a class description may list.
DESCRIBED: tuple[Operator, ...] = tuple(op for op in OPERATORS if op.described)
DESCRIBED_WIRES: frozenset[str] = frozenset(op.wire for op in DESCRIBED)
