"""The gate wire protocol: frames and values as msgpack, with no I/O and no pickle.

This module is a pure, sans-IO core in the style of h11: it turns calls, replies and errors into
bytes and back, and validates everything it decodes. It never touches a socket or shared memory;
the objects it cannot send by value are handed to a :class:`ReferenceSpace`, which the link
implements with its handle tables.

Nothing here ever executes code named by the peer: decoding builds only builtin values, proxies,
and exceptions whose class is checked to be an exception class. A frame that does not have the
exact expected shape raises :class:`~flexos.errors.ProtocolError`.

Frame layouts (all msgpack arrays)::

    CALL  [1, op, target, name, args, kwargs, releases]
    REPLY [2, value, releases]
    ERROR [3, exception, traceback_text, releases]

``releases`` is a list of ``[handle, count]`` pairs: references the sender dropped since its last
frame, piggybacked so that releasing costs no extra round trip.
"""

from __future__ import annotations

import builtins
import operator
import struct
import threading
import traceback
import types
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from flexos.errors import GateError, ProtocolError


def _wire_format() -> Any:
    """flexos's own build of msgpack's encoding (flexos._msgpack: byte-for-byte msgpack, faster
    on gate-sized frames, and loadable in subinterpreters, where msgpack's C extension is not);
    msgpack itself where that extension was not built."""
    try:
        from flexos import _msgpack

        return _msgpack
    except ImportError:
        return msgpack


_wire = _wire_format()


class Kind:
    """Frame kinds. Plain ints: msgpack's strict mode would send an IntEnum by reference."""

    CALL = 1
    REPLY = 2
    ERROR = 3


class Op:
    """Operations a call frame can ask for."""

    IMPORT = 1  # target: module name
    GETATTR = 2  # name
    SETATTR = 3  # name, args=[value]
    DELATTR = 4  # name
    CALL = 5  # args, kwargs
    CALL_METHOD = 6  # name, args, kwargs
    OPERATOR = 7  # name (a key of OPERATORS), args
    DESCRIBE = 8  # target: a class handle


_OPS = frozenset(range(Op.IMPORT, Op.DESCRIBE + 1))


class Ext:
    TUPLE = 1
    SET = 2
    FROZENSET = 3
    BIGINT = 4
    COMPLEX = 5
    REF = 7  # an object owned by the sender: [handle, class handle]
    CLASS = 8  # a class owned by the sender: handle
    BACK = 9  # an object owned by the receiver: handle
    BUILTIN = 10  # an object of the builtins module, by name
    EXCEPTION = 11  # an exception, by value: [class, args, attrs]
    LOAN = 12  # a large buffer lent without a copy (same-process peers only): transport-defined


def _exit(obj: Any, *args: Any) -> Any:
    return type(obj).__exit__(obj, *args)


def _enter(obj: Any) -> Any:
    return type(obj).__enter__(obj)


# The dunder protocols a proxy forwards, by wire name. Only these run for an OPERATOR op: the
# peer chooses a key, never a function.
OPERATORS: dict[str, Any] = {
    "len": len,
    "iter": iter,
    "next": next,
    "bool": bool,
    "repr": repr,
    "str": str,
    "dir": dir,
    "hash": hash,
    "int": int,
    "float": float,
    "index": operator.index,
    "getitem": operator.getitem,
    "setitem": operator.setitem,
    "delitem": operator.delitem,
    "contains": operator.contains,
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "enter": _enter,
    "exit": _exit,
}

# Builtins that travel by name because they are the same object on every side.
_BUILTIN_SINGLETONS = {"NotImplemented": NotImplemented, "Ellipsis": Ellipsis}
_BIGINT_LIMIT = 1 << 63


class ReferenceSpace(Protocol):
    """What the codec needs from a link to send and receive objects by reference."""

    def export(self, obj: Any) -> int: ...
    def export_class(self, cls: type) -> int: ...
    def peer_handle(self, obj: Any) -> int | None: ...
    def is_proxy_type(self, cls: type) -> bool: ...
    def proxy(self, handle: int, class_handle: int) -> Any: ...
    def proxy_class(self, handle: int, module: str = "", qualname: str = "") -> type: ...
    def resolve(self, handle: int) -> Any: ...
    def borrow(self, payload: bytes) -> Any: ...


def builtin_name(obj: Any) -> str | None:
    """The name under which ``obj`` is found in :mod:`builtins`, if it is one of its objects."""
    for name, value in _BUILTIN_SINGLETONS.items():
        if obj is value:
            return name
    name = getattr(obj, "__name__", None)
    if isinstance(name, str) and getattr(builtins, name, None) is obj:
        return name
    return None


def _build_exception(cls: Any, args: Any, attrs: Any) -> BaseException:
    """Rebuild an exception from its wire record without running code chosen by the peer."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise ProtocolError(f"exception record names {cls!r}, which is not an exception class")
    if not isinstance(args, tuple) or not isinstance(attrs, dict):
        raise ProtocolError("exception record has malformed args or attributes")
    if builtin_name(cls) is not None:
        try:
            exc = cls(*args)  # builtin constructors are safe and restore e.g. OSError.errno
        except Exception:
            exc = cls.__new__(cls)
            exc.args = args
    else:
        # Any other class: never run its __init__ on data from another compartment.
        exc = cls.__new__(cls)
        exc.args = args
    for key, value in attrs.items():
        if type(key) is not str or key.startswith("__") or (key not in _BUILTIN_EXCEPTION_ATTRS and hasattr(cls, key)):
            continue  # never shadow a method or property of the class (e.g. add_note = exec)
        if key in _BUILTIN_EXCEPTION_ATTRS:
            try:
                setattr(exc, key, value)  # slots of builtin exceptions, e.g. OSError.filename
            except (AttributeError, TypeError):
                pass
        else:
            exc.__dict__[key] = value  # never through a property setter of the class
    return exc


_INTROSPECTION_TYPES = (types.FrameType, types.CodeType, types.TracebackType)
_PAIR = struct.Struct("<QQ")  # REF payload: handle, class handle
_HANDLE = struct.Struct("<Q")  # BACK payload
# How a type crosses, as decided by Codec._classify.
(
    _PLAIN,
    _PROXY,
    _CLASS,
    _TUPLE,
    _BIGINT,
    _SET,
    _FROZENSET,
    _COMPLEX,
    _MEMORYVIEW,
    _EXCEPTION,
    _BUILTIN_FUNCTION,
    _SINGLETON,
    _REFUSED,
) = range(13)
_VALUE_KINDS = {
    tuple: _TUPLE,
    int: _BIGINT,  # msgpack packs ints natively up to 64 bits; only bigger ones come here
    bool: _BIGINT,
    set: _SET,
    frozenset: _FROZENSET,
    complex: _COMPLEX,
    memoryview: _MEMORYVIEW,
    types.BuiltinFunctionType: _BUILTIN_FUNCTION,
    type(NotImplemented): _SINGLETON,
    type(Ellipsis): _SINGLETON,
}
# Attributes of builtin exceptions that live in slots rather than args or __dict__.
_BUILTIN_EXCEPTION_ATTRS = frozenset({"filename", "filename2", "name", "path", "name_from"})
_MAX_NESTING = 32
# What decoding malformed bytes can raise: the codec's errors derive from ValueError; unhashable
# map keys give TypeError.
_DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError)


class Codec:
    """msgpack encoding of values, with flexos's own extension types for everything else.

    Immutable builtins and builtin containers travel by value; any other object travels by
    reference (a handle the receiver wraps in a proxy).
    """

    def __init__(self, space: ReferenceSpace) -> None:
        self._space = space
        self._decode_ext_hook = self._ext_hook  # bound once, not per frame
        self._wire = _wire
        self._lending: dict[str, Any] = {}
        self._packers: list[Any] = []
        self._kinds: dict[type, int] = {}
        self._depth = threading.local()

    def lend_buffers(self, lend: Callable[[Any], bytes], threshold: int) -> None:
        """Send bytes-like values of ``threshold`` bytes or more as loans made by ``lend``
        (the peer maps them instead of receiving a copy)."""
        from flexos import _msgpack  # msgpack has no hook for this

        self._wire = _msgpack
        self._lending = {"lend": lambda buffer: msgpack.ExtType(Ext.LOAN, lend(buffer)), "lend_threshold": threshold}
        self._packers.clear()

    # -- encoding ---------------------------------------------------------------------------
    def pack_frame(self, frame: list[Any]) -> bytes:
        """Encode a whole frame with a reusable packer (the hot path)."""
        # Taken out of the pool while in use: other threads, or a __del__ run by the GC
        # mid-pack that makes a gated call itself, get a packer of their own.
        try:
            packer = self._packers.pop()
        except IndexError:
            packer = self._wire.Packer(default=self._default, use_bin_type=True, strict_types=True, **self._lending)
        try:
            data = packer.pack(frame)
        except (ValueError, RecursionError) as exc:  # msgpack reports deep/cyclic structures this way
            packer.reset()
            raise GateError(f"value cannot cross a gate: {exc}") from None
        except BaseException:
            packer.reset()
            raise
        self._packers.append(packer)
        return data

    def pack(self, obj: Any) -> bytes:
        """Encode a nested value (re-entrant: a fresh packer each time).

        Nesting is bounded explicitly: each level recurses through C, and a deep enough
        structure would overflow the C stack long before Python's recursion limit.
        """
        depth = self._depth.__dict__.get("n", 0)
        if depth >= _MAX_NESTING:
            raise GateError(f"value nested more than {_MAX_NESTING} levels deep (or cyclic) cannot cross a gate")
        self._depth.n = depth + 1
        try:
            return self._wire.packb(obj, default=self._default, use_bin_type=True, strict_types=True, **self._lending)
        except (ValueError, RecursionError) as exc:  # msgpack reports deep/cyclic structures this way
            raise GateError(f"value cannot cross a gate: {exc}") from None
        finally:
            self._depth.n = depth

    def _default(self, obj: Any) -> Any:
        """Called by msgpack for everything it does not pack natively."""
        cls = type(obj)
        kind = self._kinds.get(cls)
        if kind is None:
            kind = self._kinds[cls] = self._classify(cls)
        space = self._space
        if kind == _PLAIN:  # the common case: an object of an ordinary class, by reference
            return msgpack.ExtType(Ext.REF, _PAIR.pack(space.export(obj), space.export_class(cls)))
        if kind == _PROXY:
            handle = space.peer_handle(obj)
            if handle is not None:
                return msgpack.ExtType(Ext.BACK, _HANDLE.pack(handle))
            return msgpack.ExtType(Ext.REF, _PAIR.pack(space.export(obj), space.export_class(cls)))
        if kind == _CLASS:
            handle = space.peer_handle(obj)
            if handle is not None:
                return msgpack.ExtType(Ext.BACK, _HANDLE.pack(handle))
            name = builtin_name(obj)
            if name is not None:
                return msgpack.ExtType(Ext.BUILTIN, name.encode())
            record = [space.export_class(obj), obj.__module__, obj.__qualname__]
            return msgpack.ExtType(Ext.CLASS, self.pack(record))
        if kind == _TUPLE:
            return msgpack.ExtType(Ext.TUPLE, self.pack(list(obj)))
        if kind == _BIGINT:
            length = (obj.bit_length() + 8) // 8
            return msgpack.ExtType(Ext.BIGINT, obj.to_bytes(length, "little", signed=True))
        if kind == _SET:
            return msgpack.ExtType(Ext.SET, self.pack(list(obj)))
        if kind == _FROZENSET:
            return msgpack.ExtType(Ext.FROZENSET, self.pack(list(obj)))
        if kind == _COMPLEX:
            return msgpack.ExtType(Ext.COMPLEX, self.pack([obj.real, obj.imag]))
        if kind == _MEMORYVIEW:
            return obj.tobytes()
        if kind == _EXCEPTION:
            return msgpack.ExtType(Ext.EXCEPTION, self.pack_exception(obj))
        if kind == _BUILTIN_FUNCTION:
            name = builtin_name(obj)
            if name is not None:
                return msgpack.ExtType(Ext.BUILTIN, name.encode())
            return msgpack.ExtType(Ext.REF, _PAIR.pack(space.export(obj), space.export_class(cls)))
        if kind == _SINGLETON:
            return msgpack.ExtType(Ext.BUILTIN, builtin_name(obj).encode())
        raise GateError(f"a {cls.__name__} object cannot cross a gate (it reaches the interpreter's internals)")

    def _classify(self, cls: type) -> int:
        """How values of type ``cls`` cross (decided once per type)."""
        if cls in _VALUE_KINDS:
            return _VALUE_KINDS[cls]
        if issubclass(cls, type):
            return _CLASS
        if issubclass(cls, _INTROSPECTION_TYPES):
            return _REFUSED
        if issubclass(cls, BaseException):
            return _EXCEPTION
        if self._space.is_proxy_type(cls):
            return _PROXY
        return _PLAIN

    def pack_exception(self, exc: BaseException) -> bytes:
        """The packed record [class, args, attrs] of an exception, which crosses by value.

        Packed once; only if that fails are args replaced by their reprs and attributes that
        cannot travel dropped (trial packs export handles the peer never gets, so never on the
        common path).
        """
        attrs = {key: getattr(exc, key) for key in _BUILTIN_EXCEPTION_ATTRS if getattr(exc, key, None) is not None}
        attrs.update(
            (key, value)
            for key, value in getattr(exc, "__dict__", {}).items()
            if not key.startswith("__") and not key.startswith("_flexos")
        )
        try:
            return self.pack([type(exc), tuple(exc.args), attrs])
        except GateError:
            pass
        args = tuple(exc.args)
        try:
            self.pack(args)
        except GateError:
            args = tuple(repr(a) for a in args)
        kept = {}
        for key, value in attrs.items():
            try:
                self.pack(value)
            except GateError:
                continue
            kept[key] = value
        return self.pack([type(exc), args, kept])

    # -- decoding ---------------------------------------------------------------------------
    def unpack(self, data: bytes) -> Any:
        try:
            return _wire.unpackb(data, ext_hook=self._decode_ext_hook, strict_map_key=False, raw=False)
        except ProtocolError:
            raise
        except _DECODE_ERRORS as exc:
            raise ProtocolError(f"malformed value from compartment: {type(exc).__name__}: {exc}") from None

    def _ext_hook(self, code: int, payload: bytes) -> Any:
        try:
            if code == Ext.REF:  # leaves first: they cannot nest
                return self._space.proxy(*_PAIR.unpack(payload))
            if code == Ext.BACK:
                return self._space.resolve(*_HANDLE.unpack(payload))
            if code == Ext.LOAN:
                return self._space.borrow(payload)
        except struct.error:
            raise ProtocolError("malformed object reference") from None
        # Other extension values nest through C; bound their depth before the C stack runs out.
        depth = self._depth.__dict__.get("n", 0)
        if depth >= _MAX_NESTING:
            raise ProtocolError(f"value from compartment nested more than {_MAX_NESTING} levels deep")
        self._depth.n = depth + 1
        try:
            return self._decode_ext(code, payload)
        finally:
            self._depth.n = depth

    def _decode_ext(self, code: int, payload: bytes) -> Any:
        if code == Ext.TUPLE:
            return tuple(self._expect(self.unpack(payload), list))
        if code == Ext.BIGINT:
            return int.from_bytes(payload, "little", signed=True)
        if code == Ext.SET:
            return set(self._expect(self.unpack(payload), list))
        if code == Ext.FROZENSET:
            return frozenset(self._expect(self.unpack(payload), list))
        if code == Ext.COMPLEX:
            real, imag = self._expect_pair(self.unpack(payload), float)
            return complex(real, imag)
        if code == Ext.BUILTIN:
            name = payload.decode("ascii", "replace")
            if name in _BUILTIN_SINGLETONS:
                return _BUILTIN_SINGLETONS[name]
            if name.startswith("_") or not hasattr(builtins, name):
                raise ProtocolError(f"unknown builtin {name!r}")
            return getattr(builtins, name)
        if code == Ext.EXCEPTION:
            record = self._expect(self.unpack(payload), list)
            if len(record) != 3:
                raise ProtocolError("malformed exception record")
            return _build_exception(*record)
        if code == Ext.CLASS:
            record = self._expect(self.unpack(payload), list)
            if len(record) != 3 or type(record[0]) is not int or not all(type(r) is str for r in record[1:]):
                raise ProtocolError("malformed class reference")
            return self._space.proxy_class(*record)
        raise ProtocolError(f"unknown extension type {code}")

    @staticmethod
    def _expect(value: Any, kind: type) -> Any:
        if type(value) is not kind:
            raise ProtocolError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    @staticmethod
    def _expect_pair(value: Any, kind: type) -> tuple[Any, Any]:
        if type(value) is not list or len(value) != 2 or not all(isinstance(v, kind) for v in value):
            raise ProtocolError(f"expected a pair of {kind.__name__}")
        return value[0], value[1]


# -- frames -------------------------------------------------------------------------------------
# Decoded frames are the validated msgpack lists themselves (no per-frame objects on the hot
# path): [CALL, op, target, name, args, kwargs, releases], [REPLY, value, releases] or
# [ERROR, exception, traceback, releases].


def frame_kind(data: bytes) -> int:
    """The kind of a frame without decoding it (frames are short fixarrays: 0x9N, kind)."""
    if len(data) < 2 or data[0] & 0xF0 != 0x90:
        raise ProtocolError("frame is not a flexos frame")
    return data[1]


def encode_error(codec: Codec, exc: BaseException, releases: list, with_traceback: bool = True) -> bytes:
    text = "".join(traceback.format_exception(exc)) if with_traceback else ""
    try:
        return codec.pack([Kind.ERROR, msgpack.ExtType(Ext.EXCEPTION, codec.pack_exception(exc)), text, releases])
    except Exception as fail:  # the exception's class itself cannot travel: degrade to a GateError
        summary = f"{type(exc).__qualname__}: {exc} (could not be sent: {fail})"
        record = [GateError, (summary,), {}]
        return codec.pack([Kind.ERROR, msgpack.ExtType(Ext.EXCEPTION, codec.pack(record)), text, releases])


def _check_releases(releases: Any) -> None:
    if type(releases) is not list:
        raise ProtocolError("malformed release list")
    for pair in releases:
        if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not int or type(pair[1]) is not int:
            raise ProtocolError("malformed release list")


def decode_frame(codec: Codec, data: bytes) -> list[Any]:
    """Decode and validate one frame; anything malformed raises ProtocolError."""
    try:  # Codec.unpack, inlined: two frames per gate call come through here
        frame = _wire.unpackb(data, ext_hook=codec._decode_ext_hook, strict_map_key=False, raw=False)
    except ProtocolError:
        raise
    except _DECODE_ERRORS as exc:
        raise ProtocolError(f"malformed value from compartment: {type(exc).__name__}: {exc}") from None
    if type(frame) is not list or not frame or type(frame[0]) is not int:
        raise ProtocolError("frame is not a flexos frame")
    kind, size = frame[0], len(frame)
    if kind == Kind.REPLY and size == 3:
        if type(frame[2]) is not list:
            raise ProtocolError("malformed release list")
        if frame[2]:
            _check_releases(frame[2])
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
        if type(releases) is not list:
            raise ProtocolError("malformed release list")
        if releases:
            _check_releases(releases)
        return frame
    if kind == Kind.ERROR and size == 4:
        if not isinstance(frame[1], BaseException) or type(frame[2]) is not str:
            raise ProtocolError("malformed error frame")
        if type(frame[3]) is not list:
            raise ProtocolError("malformed release list")
        if frame[3]:
            _check_releases(frame[3])
        return frame
    raise ProtocolError(f"frame of unknown kind or length (kind {kind!r}, {size} fields)")


_NO_KWARGS: dict[str, Any] = {}
_TARGETS = frozenset({int, str})
_NAMES = frozenset({str, type(None)})
