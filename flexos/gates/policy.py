"""What a peer may reach through a gate.

The rule: a peer reaches exactly the objects this side handed it (by reference) and what their
public attributes, methods and operators lead to — never this side's interpreter internals.
So a GETATTR, SETATTR, DELATTR or CALL_METHOD naming a dunder other than :data:`OPEN_DUNDERS`
(``__globals__``, ``__dict__``, ``__class__``, ``__subclasses__``, ...), or an attribute of
:data:`INTROSPECTION` (frames and code of generators, coroutines and tracebacks), is refused
with AttributeError: from those, a compartment would walk from an object it was given to every
object it was not.

Enforced elsewhere, and listed here so the policy reads in one place:

- operators: only those of the table :mod:`flexos.wire.operators` (the peer names a row,
  never a function);
- imports: only through the link's importer, which serves the modules the image places in this
  compartment (``Runtime.serve_import``); a link without one refuses every import;
- values: frames, code objects and tracebacks never cross (:mod:`flexos.wire.codec`), and
  exceptions from a peer are rebuilt without running their class's code.
"""

from __future__ import annotations

from typing import Any

from flexos.errors import ProtocolError

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


def checked_attribute(name: Any) -> str:
    """``name`` if a peer may reach the attribute of that name; AttributeError if it may not."""
    if type(name) is not str:
        raise ProtocolError("attribute name must be a string")
    if (name.startswith("__") and name.endswith("__") and name not in OPEN_DUNDERS) or name in INTROSPECTION:
        raise AttributeError(f"attribute {name!r} cannot be reached through a flexos gate")
    return name


def always_replicated(module: str) -> bool:
    """Modules every compartment has its own identical copy of, whatever the image says: a class
    of theirs that a peer sends is this side's own class, not a mirror."""
    return module == "builtins" or module == "flexos" or module.startswith("flexos.")
