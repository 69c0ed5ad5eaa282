"""Gate frames: the three messages of a link's conversation, their layouts and their validation.

Every frame is one msgpack array whose first item is its kind::

    CALL  [1, op, target, name, args, kwargs, releases]
    REPLY [2, value, releases]
    ERROR [3, exception, traceback_text, releases]

- ``op``: an :class:`Op`; ``target``: a handle (int) of an object the receiver exported, or a
  module name (str) for IMPORT; ``name``: an attribute or operator name, or None;
- ``args``: a list, or None for none; ``kwargs``: a map with str keys, or None for none;
- ``value``: any value of the codec (:mod:`flexos.wire.codec`); ``exception``: an EXCEPTION
  extension value; ``traceback_text``: the remote traceback, "" for none;
- ``releases``: ``[handle, count]`` pairs, the references the sender dropped since its last
  frame, piggybacked so that releasing costs no extra round trip.

Frames are built only by the ``encode_*`` functions below and read only through the index
constants (``CALL_OP``, ``REPLY_VALUE``, ...), so their layouts are written in this file alone. A
decoded frame is the validated msgpack list itself: no per-frame object on the hot path.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import msgpack

from flexos.errors import GateError, ProtocolError
from flexos.wire.codec import DECODE_ERRORS, Codec, Ext, encoding


class Kind:
    """Frame kinds. Plain ints: msgpack's strict mode would send an IntEnum by reference."""

    CALL = 1
    REPLY = 2
    ERROR = 3


class Op:
    """What a CALL frame asks of the object it targets, and what its REPLY holds."""

    IMPORT = 1  # target: a module name -> import_answer(module, is_package, names)
    GETATTR = 2  # name -> the attribute
    SETATTR = 3  # name, args=[value] -> None
    DELATTR = 4  # name -> None
    CALL = 5  # args, kwargs -> what the call returns
    CALL_METHOD = 6  # name, args, kwargs -> what the method returns
    OPERATOR = 7  # name (a wire name of flexos.wire.operators.FUNCTIONS), args -> the result
    DESCRIBE = 8  # target: a class handle -> a class description (flexos.wire.classes)
    # The app derives a class from one of the receiver's: target: the first base's class handle,
    # name: the class name, args=[qualname, module, bases, members] -> the new class's handle.
    # Each member is [kind, name, value], kind one of SUBCLASS_MEMBER_KINDS.
    SUBCLASS = 9
    # A method as a base class defines it (``super().name(...)`` in the app's subclass): target: an
    # instance, name, args=[base, *args] -> what the base's method returns.
    SUPER = 10
    # The app unpickles, in the compartment, what the compartment pickled of its own object
    # (OPERATOR "pickle"): target: "", args=[the pickle's bytes] -> the object (from the app only).
    UNPICKLE = 11


_OPS = frozenset(range(Op.IMPORT, Op.UNPICKLE + 1))
_OP_NAMES = {value: name for name, value in vars(Op).items() if not name.startswith("_")}


def describe_call(op: int, target: int | str, name: str | None, what: str | None = None) -> str:
    """A CALL as a person reads it (``CALL_METHOD 'execute' of object 12 (a Cursor)``), for error
    messages; ``what``: the target's kind, when the caller knows it."""
    on = f"module {target!r}" if isinstance(target, str) else f"object {target}" + (f" ({what})" if what else "")
    return f"{_OP_NAMES.get(op, op)}{f' {name!r}' if name else ''} of {on}"


# How a member of an app's subclass crosses: a method (a function the owner's class forwards
# to), a classmethod or staticmethod (the function), a property ([fget, fset, fdel]), a value.
SUBCLASS_MEMBER_KINDS = frozenset({"method", "classmethod", "staticmethod", "property", "value"})

# Positions of the fields in each kind of frame (plain ints: read on every call).
KIND = 0
CALL_OP, CALL_TARGET, CALL_NAME, CALL_ARGS, CALL_KWARGS, CALL_RELEASES = 1, 2, 3, 4, 5, 6
REPLY_VALUE, REPLY_RELEASES = 1, 2
ERROR_EXCEPTION, ERROR_TRACEBACK, ERROR_RELEASES = 1, 2, 3

Releases = list[list[int]]  # [handle, count] pairs


# -- encoding -------------------------------------------------------------------------------------
def encode_call(
    codec: Codec, op: int, target: int | str, name: str | None, args: Any, kwargs: Any, releases: Releases
) -> bytes:
    """A CALL frame; empty ``args`` and ``kwargs`` travel as None. Arguments that do not fit as
    trees (a cyclic list, nesting deeper than the bounds) travel as graphs (:func:`as_graphs`)."""
    return codec.pack_frame([Kind.CALL, op, target, name, list(args) if args else None, kwargs or None, releases])


def encode_reply(codec: Codec, value: Any, releases: Releases) -> bytes:
    """A REPLY frame; a value that does not fit as a tree travels as a graph."""
    return codec.pack_frame([Kind.REPLY, value, releases])


def as_graphs(codec: Codec, frame: list[Any]) -> list[Any] | None:
    """A CALL or REPLY frame that could not be packed, its values as graphs (None for another kind:
    there is nothing to retry). The codec asks, on that failure path only."""
    if frame[KIND] == Kind.REPLY:
        return [Kind.REPLY, codec.as_graph(frame[REPLY_VALUE]), frame[REPLY_RELEASES]]
    if frame[KIND] == Kind.CALL and (frame[CALL_ARGS] or frame[CALL_KWARGS]):
        graphs = frame[:]
        if frame[CALL_ARGS]:
            graphs[CALL_ARGS] = [codec.as_graph(arg) for arg in frame[CALL_ARGS]]
        if frame[CALL_KWARGS]:
            graphs[CALL_KWARGS] = {key: codec.as_graph(value) for key, value in frame[CALL_KWARGS].items()}
        return graphs
    return None


def remote_traceback(exc: BaseException) -> str:
    """``exc``'s traceback as the caller is shown it: from the first frame that is not the gate's
    dispatcher (the library's own), without its notes (they travel with the exception itself)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_globals.get("__name__") == "flexos.gates.link":
        tb = tb.tb_next
    shown = traceback.TracebackException(type(exc), exc, tb)
    shown.__notes__ = None
    return "".join(shown.format())


def encode_error(codec: Codec, exc: BaseException, releases: Releases, with_traceback: bool = True) -> bytes:
    """An ERROR frame; if ``exc`` itself cannot travel, a GateError that describes it."""
    text = remote_traceback(exc) if with_traceback else ""
    try:
        record = codec.pack_exception(exc)
    except Exception as fail:  # the exception's class itself cannot travel: degrade to a GateError
        record = codec.pack_exception(GateError(f"{type(exc).__qualname__}: {exc} (could not be sent: {fail})"))
    return codec.pack([Kind.ERROR, msgpack.ExtType(Ext.EXCEPTION, record), text, releases])


def import_answer(module: Any, is_package: bool, names: list[str]) -> list[Any]:
    """The value an IMPORT call answers: the module (by reference), whether it is a package, and
    the names ``from module import *`` binds."""
    return [module, is_package, names]


def checked_import_answer(answer: Any, peer: str) -> tuple[Any, bool, list[str]]:
    """``answer`` as (module, is_package, names) if it has the shape of an IMPORT answer."""
    if (
        type(answer) is not list
        or len(answer) != 3
        or type(answer[1]) is not bool
        or type(answer[2]) is not list
        or not all(type(n) is str for n in answer[2])
    ):
        raise ProtocolError(f"compartment {peer!r} answered an import with a malformed record")
    return answer[0], answer[1], answer[2]


# -- decoding -------------------------------------------------------------------------------------
def frame_kind(data: bytes) -> int:
    """The kind of a frame without decoding it (frames are short fixarrays: 0x9N, kind)."""
    if len(data) < 2 or data[0] & 0xF0 != 0x90:
        raise ProtocolError("frame is not a flexos frame")
    return data[1]


def decode_frame(codec: Codec, data: bytes) -> list[Any]:
    """Decode and validate one frame; anything malformed raises ProtocolError.

    In a CALL, absent ``args`` become ``()`` and absent ``kwargs`` an empty map.
    """
    try:  # Codec.unpack, inlined: two frames per gate call come through here
        frame = encoding.unpackb(data, ext_hook=codec.ext_hook, strict_map_key=False, raw=False)
    except ProtocolError:
        raise
    except DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed value from compartment: {type(exc).__name__}: {exc}") from None
    # Positions as in the layouts above, written as literals here (the hot path): other modules
    # use the index constants.
    if type(frame) is not list or not frame or type(frame[0]) is not int:
        raise ProtocolError("frame is not a flexos frame")
    kind, size = frame[0], len(frame)
    if kind == Kind.REPLY and size == 3:
        releases = frame[2]
        if type(releases) is not list or releases:  # none, the common case, costs no call
            _check_releases(releases)
        return frame
    if kind == Kind.CALL and size == 7:
        _, op, target, name, args, kwargs, releases = frame
        if type(op) is not int or op not in _OPS or type(target) not in _TARGETS or type(name) not in _NAMES:
            raise ProtocolError("malformed call")
        if args is None:
            frame[4] = ()
        elif type(args) is not list:
            raise ProtocolError("malformed call arguments")
        if kwargs is None:
            frame[5] = _NO_KWARGS
        elif type(kwargs) is not dict or not all(type(k) is str for k in kwargs):
            raise ProtocolError("malformed call arguments")
        if type(releases) is not list or releases:
            _check_releases(releases)
        return frame
    if kind == Kind.ERROR and size == 4:
        if not isinstance(frame[1], BaseException) or type(frame[2]) is not str:
            raise ProtocolError("malformed error frame")
        releases = frame[3]
        if type(releases) is not list or releases:
            _check_releases(releases)
        return frame
    raise ProtocolError(f"frame of unknown kind or length (kind {kind!r}, {size} fields)")


def _check_releases(releases: Any) -> None:
    if type(releases) is not list:
        raise ProtocolError("malformed release list")
    for pair in releases:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int:
            raise ProtocolError("malformed release list")


_NO_KWARGS: dict[str, Any] = {}


# -- the hot path ---------------------------------------------------------------------------------
# Frames whose values are all plain (None, bool, int within 64 bits, float, str, bytes below the
# codec's lending threshold, lists and dicts of them) are built and read in C (flexos._msgpack):
# byte for byte what encode_call / encode_reply make, and exactly what decode_frame accepts and
# returns for them. Any other frame, malformed ones included, gets None (NOT_PLAIN from
# plain_reply_value), and the caller takes the functions above, which decide as they always did.
def _no_plain_frame(*fields: Any) -> None:
    return None


def _no_plain_value(data: bytes) -> Any:
    return NOT_PLAIN


if hasattr(encoding, "call_frame"):
    NOT_PLAIN: Any = encoding.NOT_PLAIN
    plain_call_frame: Callable[[int, int | str, str | None, Any, Any, Releases, int], bytes | None] = (
        encoding.call_frame
    )
    plain_reply_frame: Callable[[Any, Releases, int], bytes | None] = encoding.reply_frame
    plain_reply_value: Callable[[bytes], Any] = encoding.reply_value
    # call_parts(frame, no_kwargs): (op, target, name, args, kwargs), and the releases as a sixth
    # item when the frame carries some; None when it is not plain.
    plain_call_parts: Callable[[bytes, dict[str, Any]], tuple[Any, ...] | None] = encoding.call_parts
    # serve_call(frame, objects, no_kwargs, dying, raw_limit): Link.dispatch's common case (see there).
    plain_serve_call: Callable[[bytes, Any, dict[str, Any], Any, int], Any] = encoding.serve_call
else:  # msgpack-python, where flexos._msgpack was not built: every frame takes the path above
    NOT_PLAIN = object()
    plain_call_frame = _no_plain_frame
    plain_reply_frame = _no_plain_frame
    plain_reply_value = _no_plain_value
    plain_call_parts = _no_plain_frame
    plain_serve_call = _no_plain_frame
NO_KWARGS = _NO_KWARGS
_TARGETS = frozenset({int, str})
_NAMES = frozenset({str, type(None)})
