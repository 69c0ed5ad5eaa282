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
import threading
from collections.abc import Callable
from typing import Any, NamedTuple


class Shape(enum.Enum):
    """How a proxy's operator method is shaped, and what it sends."""

    UNARY = "unary"  # (self): no arguments
    BINARY = "binary"  # (self, other): one argument
    SETITEM = "setitem"  # (self, key, value): two arguments
    CALL = "call"  # (self, *args, **kwargs): a CALL op, not an OPERATOR
    EXIT = "exit"  # (self, exc_type, exc, tb): the traceback stays behind (it holds frames)
    OPTIONAL = "optional"  # (self, *args): an optional argument (``pow``'s modulo, ``round``'s ndigits)
    # An awaitable (``__await__``, ``__anext__``, ``__aenter__``, ``__aexit__``): the caller awaits
    # it; the owner runs the object's awaitable to completion on its thread's event loop.
    ASYNC = "async"  # (self)
    ASYNC_EXIT = "async_exit"  # (self, exc_type, exc, tb): the traceback stays behind


def _enter(obj: Any) -> Any:
    return type(obj).__enter__(obj)


def _exit(obj: Any, *args: Any) -> Any:
    return type(obj).__exit__(obj, *args)


def _dunder(name: str) -> Callable[..., Any]:
    """The owner applies the object's own special method, not the operator: a binary operator
    answers NotImplemented to the caller, whose interpreter then tries the reflected method
    itself. (Applying ``operator.eq`` here would try the reflected method on the owner's side,
    where the other operand may be a proxy of the caller's, which would try it again on the
    caller's side, and so on until RecursionError.)"""

    def apply(obj: Any, *args: Any) -> Any:
        return getattr(type(obj), name)(obj, *args)

    apply.__name__ = name
    return apply


def _reduce_ex(obj: Any, protocol: Any) -> Any:
    """``obj.__reduce_ex__(protocol)`` if the object's class offers it: ``object``'s default
    would hand out the object's whole ``__dict__``, private attributes included."""
    cls: Any = type(obj)
    if cls.__reduce_ex__ is object.__reduce_ex__ and cls.__reduce__ is object.__reduce__:
        raise TypeError(f"a {cls.__name__} does not define __reduce_ex__ or __reduce__")
    if type(protocol) is not int:
        raise TypeError("the protocol of __reduce_ex__ must be an int")
    return cls.__reduce_ex__(obj, protocol)


_loops = threading.local()


def _run_to_completion(awaitable: Any) -> Any:
    """The owner's side of an awaited proxy: run ``awaitable`` to completion on this thread's event
    loop (one per serving thread, kept: an async generator's steps share it). Callbacks it makes
    into the caller nest, as for any call."""
    import asyncio

    loop = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _loops.loop = asyncio.new_event_loop()

    async def wait() -> Any:
        return await awaitable

    return loop.run_until_complete(wait())


def _awaited(name: str) -> Callable[..., Any]:
    """The object's special method ``name``, whose awaitable result the owner runs to completion."""

    def apply(obj: Any, *args: Any) -> Any:
        return _run_to_completion(getattr(type(obj), name)(obj, *args))

    apply.__name__ = name
    return apply


class Operator(NamedTuple):
    wire: str
    dunder: str
    shape: Shape
    function: Callable[..., Any] | None
    described: bool = True
    # The special methods whose definition by a class means it implements the operator.
    marks: tuple[str, ...] = ()


def _pickled(obj: Any, protocol: Any) -> bytes:
    import pickle  # only on this path

    return pickle.dumps(obj, protocol if type(protocol) is int else None)


def _row(wire: str, dunder: str, shape: Shape, function: Callable[..., Any] | None, **options: Any) -> Operator:
    return Operator(wire, dunder, shape, function, options.get("described", True), options.get("marks", (dunder,)))


def _numeric(name: str, shape: Shape = Shape.BINARY) -> Operator:
    return _row(name, f"__{name}__", shape, _dunder(f"__{name}__"))


_BINARY_NUMERIC: tuple[str, ...] = ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod")
_BINARY_NUMERIC += ("lshift", "rshift", "and", "or", "xor")

# In the order class descriptions list them.
OPERATORS: tuple[Operator, ...] = (
    _row("len", "__len__", Shape.UNARY, len),
    _row("iter", "__iter__", Shape.UNARY, iter),
    _row("next", "__next__", Shape.UNARY, next),
    _row("bool", "__bool__", Shape.UNARY, bool),
    _row("getitem", "__getitem__", Shape.BINARY, operator.getitem),
    _row("setitem", "__setitem__", Shape.SETITEM, operator.setitem),
    _row("delitem", "__delitem__", Shape.BINARY, operator.delitem),
    _row("contains", "__contains__", Shape.BINARY, operator.contains),
    _row("call", "__call__", Shape.CALL, None),
    _row("enter", "__enter__", Shape.UNARY, _enter),
    _row("exit", "__exit__", Shape.EXIT, _exit),
    *(_numeric(name) for name in ("eq", "ne", "lt", "le", "gt", "ge")),
    _row("str", "__str__", Shape.UNARY, str),
    _row("int", "__int__", Shape.UNARY, int),
    _row("float", "__float__", Shape.UNARY, float),
    _row("index", "__index__", Shape.UNARY, operator.index),
    # Arithmetic and bitwise operators, reflected and in-place (what they return may be
    # NotImplemented, which the caller's interpreter acts on).
    *(_numeric(name) for name in _BINARY_NUMERIC),
    _numeric("pow", Shape.OPTIONAL),
    *(_numeric(f"r{name}") for name in _BINARY_NUMERIC),
    _numeric("rpow", Shape.OPTIONAL),
    *(_numeric(f"i{name}") for name in _BINARY_NUMERIC if name != "divmod"),
    _numeric("ipow"),
    *(_numeric(name, Shape.UNARY) for name in ("neg", "pos", "abs", "invert", "complex", "bytes")),
    *(_numeric(name, Shape.UNARY) for name in ("trunc", "floor", "ceil", "reversed")),
    _numeric("round", Shape.OPTIONAL),
    _numeric("format"),
    # Protocols objects offer to libraries (markupsafe's __html__, __html_format__; __json__;
    # pickle's and PyYAML's __reduce_ex__, where the class defines it or __reduce__).
    _numeric("html", Shape.UNARY),
    _numeric("html_format"),
    _numeric("json", Shape.UNARY),
    _row("reduce_ex", "__reduce_ex__", Shape.BINARY, _reduce_ex, marks=("__reduce_ex__", "__reduce__")),
    # Coroutines, async iterators and async context managers: the caller awaits, the work runs in
    # the owner.
    _row("await", "__await__", Shape.ASYNC, _run_to_completion),
    _row("aiter", "__aiter__", Shape.UNARY, _dunder("__aiter__")),
    _row("anext", "__anext__", Shape.ASYNC, _awaited("__anext__")),
    _row("aenter", "__aenter__", Shape.ASYNC, _awaited("__aenter__")),
    _row("aexit", "__aexit__", Shape.ASYNC_EXIT, _awaited("__aexit__")),
    # The app pickles (and copies) a compartment's object in its owner, as bytes it never unpickles
    # itself (Op.UNPICKLE sends them back); a compartment may not ask this of the app's objects.
    _row("pickle", "__reduce_ex__", Shape.BINARY, _pickled, described=False),
    _row("repr", "__repr__", Shape.UNARY, repr, described=False),
    _row("dir", "__dir__", Shape.UNARY, dir, described=False),
    _row("hash", "__hash__", Shape.UNARY, hash, described=False),
)

# Derived views of the table.
BY_WIRE: dict[str, Operator] = {op.wire: op for op in OPERATORS}
# What the owner applies for an OPERATOR call, by wire name.
FUNCTIONS: dict[str, Callable[..., Any]] = {op.wire: op.function for op in OPERATORS if op.function is not None}
# The operators a class description may list.
DESCRIBED: tuple[Operator, ...] = tuple(op for op in OPERATORS if op.described)
DESCRIBED_WIRES: frozenset[str] = frozenset(op.wire for op in DESCRIBED)
