"""The value encoding: what may stand for a value inside a frame, as msgpack, with no pickle.

A pure, sans-IO core in the style of h11: :class:`Codec` turns values into bytes and back and
validates everything it decodes. It never touches a socket or shared memory; the objects it
cannot send by value are handed to a :class:`ReferenceSpace`, which the link implements with its
handle tables.

Immutable builtins and builtin containers travel by value (msgpack's own types, plus the
extension types of :class:`Ext`); modules by name; any other object by reference. Decoding builds
only builtin values, builtin classes, proxies and modules (through the reference space) and
exceptions whose class is checked to be an exception class; it never runs code named by the peer,
and it resolves by name only what is inert (builtin classes, ``NotImplemented``, ``Ellipsis``):
a callable of the peer's stays the peer's. Anything malformed raises
:class:`~flexos.errors.ProtocolError`.
"""

from __future__ import annotations

import builtins
import inspect
import itertools
import struct
import sys
import threading
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import msgpack

from flexos.errors import FlexosError, GateError, ProtocolError
from flexos.wire import bulk, values


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
    BUILTIN = 10  # a class of the builtins module, NotImplemented or Ellipsis, by name (ASCII)
    # An exception, by value: [class, args (a tuple), attributes (a str-keyed map)(, str() text(,
    # the sender's token for it, the receiver's token if it is the receiver's own exception back))]
    EXCEPTION = 11
    LOAN = 12  # a large buffer lent without a copy (same-process peers only): transport-defined
    MODULE = 13  # a module, by name (UTF-8): the receiver's own module or gate of that name
    VALUE = 14  # a stdlib value (flexos.wire.values): [row name, the row's state]
    VALUE_REF = 15  # an object of the sender's that is also a builtin value: [handle, class handle, value]
    SURROGATES = 16  # a str with lone surrogates, which msgpack's UTF-8 str cannot hold: UTF-8, surrogatepass
    GRAPH = 17  # a value that is no tree (cyclic, or deeper than the bounds): [root, nodes] (see Codec.as_graph)
    NODE = 18  # inside a GRAPH: the list or dict of that index in its nodes (a little-endian u32)
    BYTEARRAY = 19  # a bytearray: its bytes (the receiver's own copy)
    MEMORYVIEW = 20  # a memoryview: [format, shape, its bytes in C order] (a read-only view of the receiver's copy)


# Builtins that travel by name because they are the same object on every side.
_BUILTIN_SINGLETONS = {"NotImplemented": NotImplemented, "Ellipsis": Ellipsis}


class Described:
    """A class to send so that the receiver can recognise it (``isinstance``, ``except``), not use it.

    The class of an object sent by reference, of an exception, a class's bases: the receiver
    gets a CLASS reference it may DESCRIBE, never call or read (a class it is *given* as a value is
    granted instead). A link's export table holds one of these in place of such a class, so that
    every other operation a peer asks of it fails by itself, with no check on the gate's hot path.
    It has no public attribute: the class stays out of reach.
    """

    __slots__ = ("_cls",)

    def __init__(self, cls: type) -> None:
        self._cls = cls

    def _refusal(self) -> str:
        return (
            f"class {self._cls.__qualname__!r} was not granted: it was reached through the type of an object, "
            "so it may be described (isinstance, except), not called or read"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(self._refusal())

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(self._refusal())

    def __repr__(self) -> str:
        return f"<class {self._cls.__module__}.{self._cls.__qualname__}, described only>"


def described_class(ref: Described) -> type:
    """The class a :class:`Described` stands for."""
    return ref._cls


class ByReference:
    """An object to send by reference whatever its kind: the module an IMPORT answer hands the
    importer's gate (everywhere else a module crosses by name)."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class ReferenceSpace(Protocol):
    """What the codec asks of a link to send and receive objects by reference."""

    def export(self, obj: Any) -> int:
        """A handle the peer may name ``obj`` by (counted: the peer releases it)."""

    def export_class(self, cls: type) -> int:
        """The handle of class ``cls``, which the peer keeps for good, and may only describe."""

    def grant_class(self, cls: type) -> int:
        """The handle of class ``cls``, sent as a value: the peer may use it (a granted capability)."""

    def withdraw(self, exported: list[Any]) -> None:
        """Take back what an encoding that failed exported (handles) and granted (classes)."""

    def peer_handle(self, obj: Any) -> int | None:
        """The peer's handle if ``obj`` is a proxy (or mirrored class) of one of its objects."""

    def is_proxy_type(self, cls: type) -> bool:
        """Whether instances of ``cls`` may be proxies of some peer's objects."""

    def proxy(self, handle: int, class_handle: int) -> Any:
        """The local proxy of the peer's object ``handle`` (REF)."""

    def value_proxy(self, handle: int, class_handle: int, value: Any) -> Any:
        """The local value proxy of the peer's object ``handle``, a copy of ``value`` (VALUE_REF)."""

    def proxy_class(self, handle: int, module: str, qualname: str) -> type:
        """The local class standing for the peer's class ``handle`` (CLASS)."""

    def resolve(self, handle: int) -> Any:
        """Our own object the peer named by ``handle`` (BACK); ProtocolError if we never sent it."""

    def borrow(self, payload: bytes) -> Any:
        """The buffer the peer lent (LOAN); ProtocolError where the transport cannot lend."""

    def module(self, name: str) -> Any:
        """Our own module or gate ``name``, which the peer sent by name (MODULE)."""


def _is_flexos_error(cls: type) -> bool:
    """Whether ``cls`` is one of flexos's own exception classes (or derives from one)."""
    module = getattr(cls, "__module__", None)
    return issubclass(cls, FlexosError) or (
        type(module) is str and (module == "flexos" or module.startswith("flexos."))
    )


def builtin_name(obj: Any) -> str | None:
    """The name under which ``obj`` crosses by name: a class of :mod:`builtins` (or one of its
    singletons), or a stdlib class of :data:`flexos.wire.values.CLASSES_BY_NAME`."""
    for name, value in _BUILTIN_SINGLETONS.items():
        if obj is value:
            return name
    if type(obj) is type and obj in values.NAMES_OF_CLASSES:
        return values.NAMES_OF_CLASSES[obj]
    own_name = getattr(obj, "__name__", None)
    if isinstance(own_name, str) and getattr(builtins, own_name, None) is obj:
        return own_name
    return None


def _build_exception(cls: Any, args: Any, attrs: Any, text: str | None, trusted_peer: bool) -> BaseException:
    """Rebuild an exception from its wire record without running code chosen by the peer.

    ``text`` is what ``str()`` gave in the sender, which a mirrored class shows as its own (a
    library's ``__str__`` computes it from state set in an ``__init__`` that is never run here).
    One of flexos's own exception classes from a peer that is not trusted arrives as a GateError
    that says so (a compartment cannot make the app believe that flexos raised it).
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise ProtocolError(f"exception record names {cls!r}, which is not an exception class")
    if not isinstance(args, tuple) or not isinstance(attrs, dict) or type(text) not in (str, type(None)):
        raise ProtocolError("exception record has malformed args, attributes or text")
    if not trusted_peer and cls is not GateError and _is_flexos_error(cls):
        text = str(args[0]) if len(args) == 1 else str(args)
        args = (
            f"{cls.__module__}.{cls.__qualname__} from another compartment (flexos's own exceptions are "
            f"raised only by flexos itself): {text}",
        )
        cls = GateError
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
        if text is not None:
            exc.__dict__["_flexos_text"] = text
    for key, value in attrs.items():
        if key == "__notes__":
            if type(value) is list and all(type(note) is str for note in value):
                exc.__notes__ = value
            continue
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


def memoryview_record(view: memoryview) -> list[Any]:
    """[format, shape, bytes in C order] of a memoryview (any layout, strided ones included)."""
    fmt, shape = bulk.view_format(view)
    return [fmt, shape, view.tobytes()]


def built_memoryview(record: list[Any]) -> memoryview:
    """A read-only memoryview of the receiver's own copy, from a MEMORYVIEW record (checked)."""
    if len(record) != 3 or type(record[2]) is not bytes:
        raise ProtocolError("malformed memoryview record")
    fmt, shape, data = record
    bulk.check_view_format(fmt, shape, len(data))
    return bulk.shaped_view(memoryview(data), (fmt, shape))


def _built_graph(record: Any) -> Any:
    """The value of a GRAPH record ``[root, nodes]``: every node's list or dict made first, then
    filled, NODE markers replaced by them (inside tuples, sets and frozensets too)."""
    if len(record) != 2 or type(record[1]) is not list:
        raise ProtocolError("malformed graph")
    root, nodes = record
    for node in nodes:
        if type(node) is not list or len(node) != 2 or node[0] not in (0, 1) or type(node[1]) is not list:
            raise ProtocolError("malformed graph node")
    built: list[Any] = [[] if node[0] == 0 else {} for node in nodes]

    def resolve(value: Any) -> Any:
        kind = type(value)
        if kind is _Node:
            if value.index >= len(built):
                raise ProtocolError("graph node out of range")
            return built[value.index]
        if kind is tuple or kind is set or kind is frozenset:
            return kind(resolve(item) for item in value)
        if kind is list or kind is dict:  # every list and dict of a graph is one of its nodes
            raise ProtocolError("graph holds a list or dict outside its nodes")
        return value

    for (tag, content), container in zip(nodes, built, strict=True):
        if tag == 0:
            container.extend(resolve(item) for item in content)
        else:
            for pair in content:
                if type(pair) is not list or len(pair) != 2:
                    raise ProtocolError("malformed graph node")
                container[resolve(pair[0])] = resolve(pair[1])
    return resolve(root)


def _public_properties(cls: type) -> tuple[str, ...]:
    """The public properties of exception class ``cls``, whose values travel as attributes (the
    receiver's mirror has no code to compute them)."""
    return tuple(
        name
        for name in dir(cls)
        if not name.startswith("_") and isinstance(inspect.getattr_static(cls, name, None), property)
    )


_INTROSPECTION_TYPES = (types.FrameType, types.CodeType, types.TracebackType)
_PAIR = struct.Struct("<QQ")  # REF payload: handle, class handle
# A REPLY frame whose value is one REF and which carries no releases: fixarray 3, kind REPLY (2,
# frames.Kind), fixext 16 of code REF, its pair, then an empty fixarray (Codec.reference_reply).
_REFERENCE_REPLY_HEAD = bytes([0x93, 2, 0xD8, Ext.REF])
_REFERENCE_REPLY_SIZE = len(_REFERENCE_REPLY_HEAD) + _PAIR.size + 1
NOT_A_REFERENCE = object()  # what Codec.reference_in_reply returns for any other frame
_NODE = struct.Struct("<I")  # NODE payload
_HANDLE = struct.Struct("<Q")  # BACK payload
# How a type crosses, as decided by Codec._classify.
(
    _PLAIN,
    _PROXY,
    _CLASS,
    _DESCRIBED,
    _TUPLE,
    _BIGINT,
    _SET,
    _FROZENSET,
    _COMPLEX,
    _MEMORYVIEW,
    _EXCEPTION,
    _SINGLETON,
    _MODULE,
    _BY_REFERENCE,
    _REFUSED,
    _VALUE,
    _VALUE_REF,
    _SURROGATES,
    _BYTEARRAY,
) = range(19)
_VALUE_KINDS = {
    str: _SURROGATES,  # msgpack packs str natively; only one it cannot encode as UTF-8 comes here
    tuple: _TUPLE,
    int: _BIGINT,  # msgpack packs ints natively up to 64 bits; only bigger ones come here
    bool: _BIGINT,
    set: _SET,
    frozenset: _FROZENSET,
    complex: _COMPLEX,
    memoryview: _MEMORYVIEW,
    bytearray: _BYTEARRAY,
    type(NotImplemented): _SINGLETON,
    type(Ellipsis): _SINGLETON,
    Described: _DESCRIBED,
    ByReference: _BY_REFERENCE,
    **dict.fromkeys(values.BY_CLASS, _VALUE),
}
# Attributes of builtin exceptions that live in slots rather than args or __dict__.
_BUILTIN_EXCEPTION_ATTRS = frozenset({"filename", "filename2", "name", "path", "name_from"})
_MAX_NESTING = 32
#: How many of the exceptions it last sent a side keeps (strongly, tracebacks included), so that
#: one raised back through the peer's code within that many is the very object that went out.
KEPT_EXCEPTIONS = 8
_TOKEN_TYPES = (int, type(None))
_CONTAINERS = frozenset({list, dict, tuple, set, frozenset})
# Inside a GRAPH, the extension values whose items its resolution walks (and the NODE itself).
_GRAPH_WALKED = frozenset({Ext.TUPLE, Ext.SET, Ext.FROZENSET, Ext.NODE, Ext.GRAPH})
# What decoding malformed bytes can raise: the codec's errors derive from ValueError; unhashable
# map keys give TypeError.
DECODE_ERRORS = (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError)


class NotATree(GateError):
    """A value that cannot be encoded as a tree: cyclic, or nested deeper than the bounds (a
    frame's encoder then tries it as a GRAPH)."""


class _Node:
    """A NODE of a GRAPH being decoded: stands for a list or dict until they are all built."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class _Packing:
    """One encoding under way: a packer, and the handles it exported and classes it granted so far.

    If the encoding fails, what it exported is taken back (:meth:`withdraw`): the peer never got
    those handles, and must not reach the objects by guessing them. Pooled by the codec, one per
    encoding in progress, so that the journal costs no allocation per frame.
    """

    __slots__ = ("_codec", "_kinds", "_space", "default", "depth", "exported", "packer")

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._space = codec._space
        self._kinds = codec._kinds
        self.default = self._default  # bound once: msgpack calls it for every non-native value
        self.depth = 0
        self.exported: list[Any] = []  # handles exported (ints) and classes granted, in order
        self.packer = codec._encoding.Packer(
            default=self.default, use_bin_type=True, strict_types=True, **codec._lending
        )

    def pack(self, obj: Any) -> bytes:
        """Encode a nested value (re-entrant: a fresh packer each time).

        Nesting is bounded explicitly: each level recurses through C, and a deep enough
        structure would overflow the C stack long before Python's recursion limit.
        """
        depth = self.depth
        if depth >= _MAX_NESTING:
            raise NotATree(f"value nested more than {_MAX_NESTING} levels deep (or cyclic) cannot cross a gate")
        self.depth = depth + 1
        codec = self._codec
        try:
            return codec._encoding.packb(
                obj, default=self.default, use_bin_type=True, strict_types=True, **codec._lending
            )
        except (ValueError, RecursionError) as exc:  # msgpack reports deep/cyclic structures this way
            raise NotATree(f"value cannot cross a gate: {exc}") from None
        finally:
            self.depth = depth

    def withdraw(self, mark: int) -> None:
        """Take back what was exported and granted since ``mark`` (a length of the journal)."""
        exported = self.exported
        if len(exported) > mark:
            taken = exported[mark:]
            del exported[mark:]
            self._space.withdraw(taken)

    def fits(self, value: Any) -> bool:
        """Whether ``value`` can be encoded; a trial, so what it exported is taken back."""
        mark = len(self.exported)
        try:
            self.pack(value)
        except GateError:
            return False
        finally:
            self.withdraw(mark)
        return True

    def _default(self, obj: Any) -> Any:
        """Called by msgpack for everything it does not pack natively."""
        cls = type(obj)
        kinds = self._kinds
        kind = kinds.get(cls)
        if kind is None:
            kind = kinds[cls] = self._codec._classify(cls)
        space = self._space
        if kind == _PLAIN:  # the common case: an object of an ordinary class, by reference
            handle = space.export(obj)
            self.exported.append(handle)
            return msgpack.ExtType(Ext.REF, _PAIR.pack(handle, space.export_class(cls)))
        if kind == _PROXY:
            back = space.peer_handle(obj)
            if back is not None:
                return msgpack.ExtType(Ext.BACK, _HANDLE.pack(back))
            handle = space.export(obj)
            self.exported.append(handle)
            return msgpack.ExtType(Ext.REF, _PAIR.pack(handle, space.export_class(cls)))
        if kind == _CLASS or kind == _DESCRIBED:  # granted (a class value) or described only
            target = obj if kind == _CLASS else described_class(obj)
            back = space.peer_handle(target)
            if back is not None:
                return msgpack.ExtType(Ext.BACK, _HANDLE.pack(back))
            name = builtin_name(target)
            if name is not None:
                return msgpack.ExtType(Ext.BUILTIN, name.encode())
            if kind == _CLASS:
                handle = space.grant_class(target)
                self.exported.append(target)
            else:
                handle = space.export_class(target)
            return msgpack.ExtType(Ext.CLASS, self.pack([handle, target.__module__, target.__qualname__]))
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
        if kind == _BYTEARRAY:
            return msgpack.ExtType(Ext.BYTEARRAY, bytes(obj))
        if kind == _MEMORYVIEW:
            return msgpack.ExtType(Ext.MEMORYVIEW, self.pack(memoryview_record(obj)))
        if kind == _EXCEPTION:
            return msgpack.ExtType(Ext.EXCEPTION, self.pack_exception(obj))
        if kind == _SINGLETON:
            return msgpack.ExtType(Ext.BUILTIN, b"NotImplemented" if obj is NotImplemented else b"Ellipsis")
        if kind == _MODULE:  # never by reference: the receiver takes its own module of that name
            name = obj.__name__
            if type(name) is not str:
                raise GateError("a module without a name cannot cross a gate")
            return msgpack.ExtType(Ext.MODULE, name.encode())
        if kind == _SURROGATES:
            return msgpack.ExtType(Ext.SURROGATES, obj.encode("utf-8", "surrogatepass"))
        if kind == _VALUE:
            row = values.BY_CLASS[cls]
            return msgpack.ExtType(Ext.VALUE, self.pack([row.wire, row.state(obj)]))
        if kind == _VALUE_REF:  # the peer's own value proxy goes back as its object
            back = space.peer_handle(obj)
            if back is not None:
                return msgpack.ExtType(Ext.BACK, _HANDLE.pack(back))
            handle = space.export(obj)
            self.exported.append(handle)
            value = self._codec._value_of(cls)(obj)
            return msgpack.ExtType(Ext.VALUE_REF, self.pack([handle, space.export_class(cls), value]))
        if kind == _BY_REFERENCE:
            target = obj.obj
            handle = space.export(target)
            self.exported.append(handle)
            return msgpack.ExtType(Ext.REF, _PAIR.pack(handle, space.export_class(type(target))))
        raise GateError(f"a {cls.__name__} object cannot cross a gate (it reaches the interpreter's internals)")

    def pack_exception(self, exc: BaseException) -> bytes:
        """The packed record [class, args, attrs, text] of an exception, which crosses by value.

        Its class crosses described only (the receiver matches it, never calls it). Attributes
        are its ``__dict__`` (its ``__notes__`` included), the slots of builtin exceptions and
        the values of its class's public properties; ``text`` is its ``str()``. Packed once; only
        if that fails are args replaced by their reprs and attributes that cannot travel dropped,
        and what the failed tries exported is taken back.
        """
        cls = type(exc)
        attrs = {key: getattr(exc, key) for key in _BUILTIN_EXCEPTION_ATTRS if getattr(exc, key, None) is not None}
        attrs.update(
            (key, value)
            for key, value in getattr(exc, "__dict__", {}).items()
            if key == "__notes__" or not (key.startswith("__") or key.startswith("_flexos"))
        )
        properties = self._codec._properties.get(cls)
        if properties is None:
            properties = self._codec._properties[cls] = _public_properties(cls)
        for name in properties:
            try:
                attrs.setdefault(name, getattr(exc, name))
            except Exception:  # a property that fails here would fail in the receiver too
                pass
        try:
            text = str(exc)
        except Exception:
            text = BaseException.__str__(exc)
        record_class = Described(cls)
        mine, yours = self._codec.exception_tokens(exc)
        mark = len(self.exported)
        try:
            return self.pack([record_class, tuple(exc.args), attrs, text, mine, yours])
        except GateError:
            self.withdraw(mark)
        args = tuple(exc.args)
        if not self.fits(args):
            args = tuple(repr(a) for a in args)
        kept = {key: value for key, value in attrs.items() if self.fits(value)}
        return self.pack([record_class, args, kept, text, mine, yours])


class Codec:
    """msgpack encoding of values, with flexos's own extension types for everything else.

    Immutable builtins and builtin containers travel by value; modules by name; any other object
    by reference (a handle the receiver wraps in a proxy). ``trusted_peer``: flexos's own
    exception classes the peer sends are rebuilt as themselves (the app, for its compartments);
    from any other peer they arrive as GateError.
    """

    def __init__(
        self, space: ReferenceSpace, *, trusted_peer: bool = False, containers_as_copies: bool = False
    ) -> None:
        self._space = space
        self._trusted_peer = trusted_peer
        self._containers_as_copies = containers_as_copies
        # The bound extension decoder, made once rather than per frame (decode_frame passes it too).
        self.ext_hook = self._ext_hook
        self._encoding = encoding  # for packing: lend_buffers needs flexos._msgpack
        self._lending: dict[str, Any] = {}
        # Bytes this long or longer are lent, so the hot path (frames.plain_call_frame) leaves them to the packer.
        self.raw_limit = sys.maxsize
        self._pool: list[_Packing] = []
        self._kinds: dict[type, int] = {}
        self._values: dict[type, Callable[[Any], Any]] = {}  # builtin subclass -> its exact builtin value
        self._properties: dict[type, tuple[str, ...]] = {}  # exception class -> its public properties
        # The last exceptions sent (token -> exception) and received (id -> (replica, the peer's
        # token)), so that an exception which comes back is the very object that went out.
        self._sent_exceptions: OrderedDict[int, BaseException] = OrderedDict()
        self._received_exceptions: OrderedDict[int, tuple[BaseException, int]] = OrderedDict()
        self._exception_tokens = itertools.count(1)
        self._depth = threading.local()  # of decoding

    def lend_buffers(self, lend: Callable[[Any], bytes], threshold: int) -> None:
        """Send bytes-like values of ``threshold`` bytes or more as loans made by ``lend``
        (the peer maps them instead of receiving a copy)."""
        from flexos import _msgpack  # msgpack has no hook for this

        self._encoding = _msgpack
        self._lending = {"lend": lambda buffer: msgpack.ExtType(Ext.LOAN, lend(buffer)), "lend_threshold": threshold}
        self.raw_limit = threshold
        self._pool.clear()

    def stop_lending(self) -> None:
        """Copy every buffer into the frame again (the lender is gone, e.g. after a fork)."""
        self._encoding = encoding
        self._lending = {}
        self.raw_limit = sys.maxsize
        self._pool.clear()

    # -- exceptions that go out and come back ------------------------------------------------
    def exception_tokens(self, exc: BaseException) -> tuple[int, int | None]:
        """The token under which ``exc`` is kept while it is out (one of the last
        :data:`KEPT_EXCEPTIONS` sent), and the peer's token for it if it is one the peer sent."""
        token = next(self._exception_tokens)
        sent = self._sent_exceptions
        sent[token] = exc
        if len(sent) > KEPT_EXCEPTIONS:
            sent.popitem(last=False)
        received = self._received_exceptions.get(id(exc))
        return token, received[1] if received is not None and received[0] is exc else None

    def is_own_exception(self, exc: BaseException) -> bool:
        """Whether ``exc``, just decoded, is one this side sent that came back (not a replica)."""
        return any(kept is exc for kept in list(self._sent_exceptions.values()))

    def _exception_back(self, token: Any, cls: Any, attrs: Any) -> BaseException | None:
        """Our own exception ``token`` the peer returns (raised through its code), with the notes
        that code added; None if it is not one we still keep, or the record's class is not its, or
        it is one of flexos's own from a peer we do not trust (the app's refusal of a compartment's
        request is not the app's to see again as raised by flexos on its own call)."""
        exc = self._sent_exceptions.get(token) if type(token) is int else None
        if exc is None or cls is not type(exc):
            return None
        if not self._trusted_peer and _is_flexos_error(cls):
            return None  # arrives as a GateError, as flexos's own exceptions from a compartment do
        notes = attrs.get("__notes__") if isinstance(attrs, dict) else None
        ours = list(getattr(exc, "__notes__", None) or ())
        if type(notes) is list and notes[: len(ours)] == ours:
            for note in notes[len(ours) :]:
                if type(note) is str:
                    BaseException.add_note(exc, note)  # unbound: the app's class may define add_note
        return exc

    def _received_exception(self, exc: BaseException, token: Any) -> BaseException:
        if type(token) is int:
            received = self._received_exceptions
            received[id(exc)] = (exc, token)
            if len(received) > KEPT_EXCEPTIONS:
                received.popitem(last=False)
        return exc

    # -- encoding ---------------------------------------------------------------------------
    def pack_frame(self, frame: list[Any]) -> bytes:
        """Encode a whole frame with a pooled packer (the hot path)."""
        # Taken out of the pool while in use: other threads, or a __del__ run by the GC
        # mid-pack that makes a gated call itself, get a packing of their own.
        try:
            packing = self._pool.pop()
        except IndexError:
            packing = _Packing(self)
        try:
            data = packing.packer.pack(frame)
        except (ValueError, RecursionError, NotATree) as exc:  # msgpack reports deep/cyclic structures so
            packing.packer.reset()
            packing.withdraw(0)
            return self._pack_as_graphs(frame, exc)
        except BaseException:
            packing.packer.reset()
            packing.withdraw(0)
            raise
        if packing.exported:  # sent: the peer holds them now
            packing.exported.clear()
        self._pool.append(packing)
        return data

    def _pack_as_graphs(self, frame: list[Any], failure: BaseException) -> bytes:
        """``frame`` again with its values as graphs (:meth:`as_graph`), after it could not be
        packed as a tree; NotATree if it has none to retry, or fails again."""
        from flexos.wire.frames import as_graphs  # frames builds on the codec: imported on this path only

        retry = as_graphs(self, frame)
        if retry is None:
            raise failure if isinstance(failure, NotATree) else NotATree(f"value cannot cross a gate: {failure}")
        return self._encoded(_Packing.pack, retry)

    def pack(self, obj: Any) -> bytes:
        """Encode a value on its own (what it exports is taken back if that fails)."""
        return self._encoded(_Packing.pack, obj)

    def pack_exception(self, exc: BaseException) -> bytes:
        """The packed record of an exception (:meth:`_Packing.pack_exception`), on its own."""
        return self._encoded(_Packing.pack_exception, exc)

    def _encoded(self, encode: Callable[[_Packing, Any], bytes], value: Any) -> bytes:
        try:
            packing = self._pool.pop()
        except IndexError:
            packing = _Packing(self)
        try:
            return encode(packing, value)
        except BaseException:
            packing.withdraw(0)
            raise
        finally:
            packing.exported.clear()
            self._pool.append(packing)

    def as_graph(self, value: Any) -> Any:
        """``value`` as a GRAPH if it holds lists or dicts: each list and dict becomes a node, named
        by index wherever it occurs, so cycles and shared containers are kept and no node nests in
        another (a value too deep for the bounds crosses too). For a value that does not fit as a
        tree; tuples, sets and frozensets stay values (and must fit the bounds)."""
        if type(value) not in _CONTAINERS:
            return value
        nodes: list[Any] = []
        index: dict[int, int] = {}
        pending: list[tuple[int, Any]] = []

        def ref(obj: Any) -> Any:
            kind = type(obj)
            if kind is list or kind is dict:
                number = index.get(id(obj))
                if number is None:
                    number = index[id(obj)] = len(nodes)
                    nodes.append(obj)  # replaced by its content below; keeps its id unique meanwhile
                    pending.append((number, obj))
                return msgpack.ExtType(Ext.NODE, _NODE.pack(number))
            if kind is tuple or kind is set or kind is frozenset:
                return kind(ref(item) for item in obj)
            return obj

        try:
            root = ref(value)
            while pending:
                number, obj = pending.pop()
                if type(obj) is list:
                    nodes[number] = [0, [ref(item) for item in obj]]
                else:
                    nodes[number] = [1, [[ref(key), ref(item)] for key, item in obj.items()]]
        except RecursionError:
            raise GateError("value nested too deeply (in tuples or sets) to cross a gate") from None
        return msgpack.ExtType(Ext.GRAPH, self.pack([root, nodes]))

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
        if issubclass(cls, types.ModuleType):
            return _MODULE
        if issubclass(cls, values.VALUE_BASE_CLASSES):
            self._values[cls] = values.VALUE_BASES[values.value_base(cls)][1]
            return _VALUE_REF
        if self._space.is_proxy_type(cls):
            return _PROXY
        if self._containers_as_copies and issubclass(cls, values.CONTAINER_BASE_CLASSES):
            self._values[cls] = values.CONTAINER_BASES[values.container_base(cls)][1]
            return _VALUE_REF
        return _PLAIN

    def _value_of(self, cls: type) -> Callable[[Any], Any]:
        """How to take the exact builtin value out of an instance of builtin subclass ``cls``."""
        return self._values[cls]

    # -- an object by reference, the common result that is not plain ------------------------
    def reference_reply(self, obj: Any) -> bytes | None:
        """The REPLY frame ``[REPLY, REF(handle, class handle), []]`` of ``obj`` when it is an object
        of an ordinary class this codec has met before: byte for byte what encode_reply makes, with
        the same exports, without msgpack's detour through ``_default``. None: encode_reply decides."""
        cls = type(obj)
        if self._kinds.get(cls) != _PLAIN:
            return None
        space = self._space
        handle = space.export(obj)
        return _REFERENCE_REPLY_HEAD + _PAIR.pack(handle, space.export_class(cls)) + b"\x90"

    def reference_in_reply(self, data: bytes) -> Any:
        """The proxy a REPLY frame ``[REPLY, REF(handle, class handle), []]`` names, as decode_frame
        would give it; NOT_A_REFERENCE for any other frame (decode_frame decides)."""
        if len(data) != _REFERENCE_REPLY_SIZE or not data.startswith(_REFERENCE_REPLY_HEAD) or data[-1] != 0x90:
            return NOT_A_REFERENCE
        try:
            return self._space.proxy(*_PAIR.unpack_from(data, len(_REFERENCE_REPLY_HEAD)))
        except ProtocolError:
            raise
        except DECODE_ERRORS as exc:  # as decode_frame reports what its extension hook raised
            raise ProtocolError(f"malformed value from compartment: {type(exc).__name__}: {exc}") from None

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
        in_graph = code not in _GRAPH_WALKED and self._depth.__dict__.get("graph")
        if in_graph:  # a NODE may stand only where the graph's resolution looks
            self._depth.graph = False
        try:
            return self._decode_ext(code, payload)
        finally:
            self._depth.n = depth
            if in_graph:
                self._depth.graph = True

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
            if name in values.CLASSES_BY_NAME:
                return values.CLASSES_BY_NAME[name]
            if name.startswith("_") or not hasattr(builtins, name):
                raise ProtocolError(f"unknown builtin {name!r}")
            value = getattr(builtins, name)
            if not isinstance(value, type):  # eval, exec, open...: a peer's own stays the peer's
                raise ProtocolError(f"builtin {name!r} is not a class: only classes of builtins cross by name")
            return value
        if code == Ext.MODULE:
            name = payload.decode("utf-8")
            if not all(part.isidentifier() for part in name.split(".")):
                raise ProtocolError(f"module name {name!r} is not a dotted name")
            return self._space.module(name)
        if code == Ext.EXCEPTION:
            record = self._expect(self.unpack(payload), list)
            if len(record) not in (3, 4, 6):
                raise ProtocolError("malformed exception record")
            cls, args, attrs, *rest = record  # the text and the tokens are optional
            mine, yours = rest[1:] if len(rest) == 3 else (None, None)
            if not (type(mine) in _TOKEN_TYPES and type(yours) in _TOKEN_TYPES):
                raise ProtocolError("exception record has malformed tokens")
            if yours is not None:
                back = self._exception_back(yours, cls, attrs)
                if back is not None:
                    return back
            exc = _build_exception(cls, args, attrs, rest[0] if rest else None, self._trusted_peer)
            return exc if mine is None else self._received_exception(exc, mine)
        if code == Ext.SURROGATES:
            return payload.decode("utf-8", "surrogatepass")
        if code == Ext.BYTEARRAY:
            return bytearray(payload)
        if code == Ext.MEMORYVIEW:
            return built_memoryview(self._expect(self.unpack(payload), list))
        if code == Ext.NODE:
            if not self._depth.__dict__.get("graph") or len(payload) != _NODE.size:
                raise ProtocolError("malformed graph node, or one outside a graph")
            return _Node(*_NODE.unpack(payload))
        if code == Ext.GRAPH:
            if self._depth.__dict__.get("graph"):
                raise ProtocolError("graph inside a graph")
            self._depth.graph = True
            try:
                record = self._expect(self.unpack(payload), list)
            finally:
                self._depth.graph = False
            return _built_graph(record)
        if code == Ext.VALUE:
            record = self._expect(self.unpack(payload), list)
            row = values.BY_WIRE.get(record[0]) if len(record) == 2 and type(record[0]) is str else None
            if row is None:
                raise ProtocolError("malformed or unknown value record")
            return row.build(record[1])  # ValueError/TypeError on a bad state: ProtocolError in unpack
        if code == Ext.VALUE_REF:
            record = self._expect(self.unpack(payload), list)
            if len(record) != 3 or type(record[0]) is not int or type(record[1]) is not int:
                raise ProtocolError("malformed value reference")
            return self._space.value_proxy(*record)
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
