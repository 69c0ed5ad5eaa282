"""The value encoding: what may stand for a value inside a frame, as msgpack, with no pickle.

A pure, sans-IO core in the style of h11: :class:`Codec` turns values into bytes and back and
validates everything it decodes. It never touches a socket or shared memory; the objects it
cannot send by value are handed to a :class:`ReferenceSpace`, which the link implements with its
handle tables.

Immutable builtins and builtin containers travel by value (msgpack's own types, plus the
extension types of :class:`Ext`); any other object travels by reference. Decoding builds only
builtin values, proxies (through the reference space) and exceptions whose class is checked to be
an exception class; it never runs code named by the peer. Anything malformed raises
:class:`~flexos.errors.ProtocolError`.
"""

from __future__ import annotations

import builtins
import struct
import threading
import types
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from flexos.errors import GateError, ProtocolError


def _encoding() -> Any:
    """flexos's own build of msgpack's encoding (flexos._msgpack: byte-for-byte msgpack, faster
    on gate-sized frames, and loadable in subinterpreters, where msgpack's C extension is not);
    msgpack itself where that extension was not built."""
    try:
        from flexos import _msgpack

        return _msgpack
    except ImportError:
        return msgpack


# The msgpack implementation every decoder uses (frames.decode_frame calls it directly).
encoding = _encoding()


class Ext:
    """msgpack extension type codes, and what each payload holds."""

    TUPLE = 1  # a tuple: its items, packed as a list
    SET = 2  # a set: its items, packed as a list
    FROZENSET = 3  # a frozenset: its items, packed as a list
    BIGINT = 4  # an int beyond 64 bits: little-endian two's complement bytes
    COMPLEX = 5  # a complex: [real, imag], two floats
    REF = 7  # an object owned by the sender: handle, class handle (two little-endian u64)
    CLASS = 8  # a class owned by the sender: [class handle, module, qualname]
    BACK = 9  # an object owned by the receiver: its handle (a little-endian u64)
    BUILTIN = 10  # an object of the builtins module, by name (ASCII)
    EXCEPTION = 11  # an exception, by value: [class, args (a tuple), attributes (a str-keyed map)]
    LOAN = 12  # a large buffer lent without a copy (same-process peers only): transport-defined


# Builtins that travel by name because they are the same object on every side.
_BUILTIN_SINGLETONS = {"NotImplemented": NotImplemented, "Ellipsis": Ellipsis}


class ReferenceSpace(Protocol):
    """What the codec asks of a link to send and receive objects by reference."""

    def export(self, obj: Any) -> int:
        """A handle the peer may name ``obj`` by (counted: the peer releases it)."""

    def export_class(self, cls: type) -> int:
        """The handle of class ``cls``, which the peer keeps for good."""

    def peer_handle(self, obj: Any) -> int | None:
        """The peer's handle if ``obj`` is a proxy (or mirrored class) of one of its objects."""

    def is_proxy_type(self, cls: type) -> bool:
        """Whether instances of ``cls`` may be proxies of some peer's objects."""

    def proxy(self, handle: int, class_handle: int) -> Any:
        """The local proxy of the peer's object ``handle`` (REF)."""

    def proxy_class(self, handle: int, module: str, qualname: str) -> type:
        """The local class standing for the peer's class ``handle`` (CLASS)."""

    def resolve(self, handle: int) -> Any:
        """Our own object the peer named by ``handle`` (BACK); ProtocolError if we never sent it."""

    def borrow(self, payload: bytes) -> Any:
        """The buffer the peer lent (LOAN); ProtocolError where the transport cannot lend."""


def builtin_name(obj: Any) -> str | None:
    """The name under which ``obj`` is found in :mod:`builtins`, if it is one of its objects."""
    for name, value in _BUILTIN_SINGLETONS.items():
        if obj is value:
            return name
    own_name = getattr(obj, "__name__", None)
    if isinstance(own_name, str) and getattr(builtins, own_name, None) is obj:
        return own_name
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
    _BUILTIN_BY_NAME,
    _REFUSED,
) = range(12)
_VALUE_KINDS = {
    tuple: _TUPLE,
    int: _BIGINT,  # msgpack packs ints natively up to 64 bits; only bigger ones come here
    bool: _BIGINT,
    set: _SET,
    frozenset: _FROZENSET,
    complex: _COMPLEX,
    memoryview: _MEMORYVIEW,
    types.BuiltinFunctionType: _BUILTIN_BY_NAME,
    type(NotImplemented): _BUILTIN_BY_NAME,
    type(Ellipsis): _BUILTIN_BY_NAME,
}
# Attributes of builtin exceptions that live in slots rather than args or __dict__.
_BUILTIN_EXCEPTION_ATTRS = frozenset({"filename", "filename2", "name", "path", "name_from"})
_MAX_NESTING = 32
# What decoding malformed bytes can raise: the codec's errors derive from ValueError; unhashable
# map keys give TypeError.
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError)


class Codec:
    """msgpack encoding of values, with flexos's own extension types for everything else.

    Immutable builtins and builtin containers travel by value; any other object travels by
    reference (a handle the receiver wraps in a proxy).
    """

    def __init__(self, space: ReferenceSpace) -> None:
        self._space = space
        # The bound extension decoder, made once rather than per frame (decode_frame passes it too).
        self.ext_hook = self._ext_hook
        self._encoding = encoding  # for packing: lend_buffers needs flexos._msgpack
        self._lending: dict[str, Any] = {}
        self._packers: list[Any] = []
        self._kinds: dict[type, int] = {}
        self._depth = threading.local()

    def lend_buffers(self, lend: Callable[[Any], bytes], threshold: int) -> None:
        """Send bytes-like values of ``threshold`` bytes or more as loans made by ``lend``
        (the peer maps them instead of receiving a copy)."""
        from flexos import _msgpack  # msgpack has no hook for this

        self._encoding = _msgpack
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
            packer = self._encoding.Packer(default=self._default, use_bin_type=True, strict_types=True, **self._lending)
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
            return self._encoding.packb(
                obj, default=self._default, use_bin_type=True, strict_types=True, **self._lending
            )
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
        if kind == _BUILTIN_BY_NAME:  # by name if builtins' own (the singletons always are)
            name = builtin_name(obj)
            if name is not None:
                return msgpack.ExtType(Ext.BUILTIN, name.encode())
            return msgpack.ExtType(Ext.REF, _PAIR.pack(space.export(obj), space.export_class(cls)))
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
            return encoding.unpackb(data, ext_hook=self.ext_hook, strict_map_key=False, raw=False)
        except ProtocolError:
            raise
        except DECODE_ERRORS as exc:
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
