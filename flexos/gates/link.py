"""A link: this process's side of the gates to one peer compartment.

It makes calls (encode, exchange over a channel, decode), serves the peer's calls on its own
objects, and implements the codec's :class:`~flexos.wire.codec.ReferenceSpace` with the two
handle tables. Each thread gets its own channel for the length of its outermost call, so replies
always reach their caller; a call the peer makes while serving ours (a callback) arrives on that
same channel and runs on the waiting thread, which makes A→B→A→B nesting plain recursion.
"""

from __future__ import annotations

import importlib
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from flexos.errors import CompartmentCrashed, FlexosError, GateError, ProtocolError, RemoteTraceback
from flexos.gates import stats
from flexos.gates.handles import MAX_HANDLES, ExportTable, ImportTable
from flexos.gates.policy import APP_POLICY, COMPARTMENT_POLICY, always_replicated
from flexos.gates.proxies import (
    Mirrors,
    ModuleFunction,
    RemoteObject,
    RemoteValue,
    build_subclass,
    mirror_class,
    new_proxy,
    new_value_proxy,
    reachable_by_name,
    refill_container,
)
from flexos.transports import (
    CallTimeout,
    Channel,
    ChannelClosed,
    DeadTransport,
    PeerGone,
    ReplyTooLarge,
    ServedChannel,
    Transport,
)
from flexos.transports.bulk import BulkPort
from flexos.wire.bulk import THRESHOLD as BULK_THRESHOLD
from flexos.wire.classes import checked_description, describe_class
from flexos.wire.codec import NOT_A_REFERENCE, ByReference, Codec, Described, described_class
from flexos.wire.frames import (
    CALL_ARGS,
    CALL_KWARGS,
    CALL_NAME,
    CALL_OP,
    CALL_RELEASES,
    CALL_TARGET,
    ERROR_EXCEPTION,
    ERROR_RELEASES,
    ERROR_TRACEBACK,
    KIND,
    NO_KWARGS,
    NOT_PLAIN,
    REPLY_RELEASES,
    REPLY_VALUE,
    Kind,
    Op,
    Releases,
    decode_frame,
    describe_call,
    encode_call,
    encode_error,
    encode_reply,
    frame_kind,
    import_answer,
    plain_call_frame,
    plain_reply_frame,
    plain_reply_value,
    plain_serve_call,
)
from flexos.wire.operators import FUNCTIONS

_NO_RELEASES: Releases = []  # shared: never appended to
_SET_CAUSE = BaseException.__dict__["__cause__"].__set__  # never a property a peer's class defines
# Mutable containers that an instance of an app's subclass holds as attributes: the app reads them
# by reference (a live view), since its methods are the instance's and mutate its state in place.
_LIVE_STATE = frozenset({list, dict, set})


def _local_class(module: str, qualname: str) -> type | None:
    """This side's own class ``module.qualname``, if that module is already loaded (never imports)."""
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None or part == "<locals>":
            return None
        obj = getattr(obj, part, None)
    if isinstance(obj, type) and obj.__module__ == module and obj.__qualname__ == qualname:
        return obj
    return None


class Link:
    """Gates between this process and one peer compartment.

    ``peer_is_app``: the peer is the app (the default compartment), the principal, whose requests
    this side serves as Python would; any other peer's requests are served under the capability
    policy (:mod:`flexos.gates.policy`): it may hold a bounded number of this side's objects, call
    only the classes it was given, and flexos's own exceptions it sends arrive as GateError.
    ``app_side``: this is the app's link to a compartment, over which the app's ``dict`` and
    ``list`` subclasses cross as container copies (:data:`flexos.wire.values.CONTAINER_BASES`).
    """

    def __init__(
        self,
        peer: str,
        *,
        importer: Callable[[str], Any] | None = None,
        mirrors: Mirrors | None = None,
        replicated: Callable[[str], bool] | None = None,
        peer_is_app: bool = False,
        app_side: bool = False,
    ) -> None:
        self.peer = peer
        self.peer_is_app = peer_is_app
        self.app_side = app_side
        self.codec = Codec(self, trusted_peer=peer_is_app, containers_as_copies=app_side)
        self.exports = ExportTable(f"compartment {peer!r}", None if peer_is_app else MAX_HANDLES)
        self._exported = self.exports.objects  # handle -> [object, count], read on every call served
        self.imports = ImportTable()
        policy = APP_POLICY if peer_is_app else COMPARTMENT_POLICY
        self._readable, self._writable, self._private_methods = policy
        self.closed = False
        self._import = importer
        self._replicated = replicated or always_replicated
        # Set by whoever can restart the peer: re-resolves a class by name in its new instance.
        self.rebind: Callable[[str, str], Any] | None = None
        # Seconds a call may take, its callbacks included (None: forever); past it the peer is ended.
        self.timeout: float | None = None
        self._mirrors = mirrors if mirrors is not None else {}
        self._classes: dict[int, type] = {}
        # handle -> the by-name ModuleFunction of that function (flexos.gates.proxies.ModuleProxy):
        # one per function, however many module attributes name it, so ``m.f is m.sub.f`` holds.
        self.module_functions: dict[int, Any] = {}
        self._class_handles: dict[type, int] = {}
        self._grants: dict[type, int] = {}  # class -> how many sent values grant it (taken back if one fails)
        self._export_lock = threading.Lock()
        self._class_lock = threading.RLock()
        self._transport: Transport = DeadTransport(lambda: FlexosError(f"link to compartment {peer!r} is closed"))
        self._free: list[Channel] = []
        self._local = threading.local()
        self._inline: Channel | None = None
        self.bulk: BulkPort | None = None  # large buffers beside the frames (a process compartment and the app)
        # dispatch() runs a plain CALL itself, as _execute would; False once _execute is wrapped (stats).
        self._plain_execute = True
        if not peer_is_app and stats.enabled():  # the app's side counts (flexos run --stats)
            stats.instrument(self)

    def carry_bulk(self, port: BulkPort) -> None:
        """Send bytes-like values of BULK_THRESHOLD bytes or more through ``port`` (and take them)."""
        self.bulk = port
        self.codec.lend_buffers(port.lend, BULK_THRESHOLD)

    def attach(self, transport: Transport) -> None:
        self._transport = transport
        # The peer runs on the caller's own stack (loopback, subinterp): one re-entrant channel for
        # every thread, nested calls are recursion, and no per-thread bookkeeping is needed.
        self._inline = transport.open_channel() if getattr(transport, "inline", False) else None

    # -- calling the peer ---------------------------------------------------------------------
    def call(self, op: int, target: int | str, name: str | None = None, args: Any = (), kwargs: Any = None) -> Any:
        if self.closed:
            raise self.closed_error()
        imports = self.imports
        codec = self.codec
        releases = imports.take_releases() if imports.dying else _NO_RELEASES
        frame = plain_call_frame(op, target, name, args, kwargs, releases, codec.raw_limit)
        if frame is None:  # not all plain: the codec's own path (references, extension types, graphs)
            frame = encode_call(codec, op, target, name, args, kwargs, releases)
        channel = self._inline
        if channel is not None and self.bulk is None:
            # The peer runs on our own stack: no channel to keep, no deadline, and its calls back
            # are recursion (a CALL frame as its answer is malformed: _answer refuses it).
            try:
                reply = channel.exchange(frame)
                value = plain_reply_value(reply)
                if value is not NOT_PLAIN:
                    return value
                value = codec.reference_in_reply(reply)
                if value is not NOT_A_REFERENCE:
                    return value
                result = decode_frame(codec, reply)
            except (PeerGone, ReplyTooLarge) as failure:
                raise self._failed(failure, op, target, name, None) from None
            return self._answer(result)
        outermost = False
        timeout = self.timeout
        deadline = None  # an inline peer runs on our own stack: nothing to time out
        if channel is None:
            local = self._local
            channel = getattr(local, "channel", None)
            outermost = channel is None
            if channel is None:
                try:
                    channel = self._free.pop()
                except IndexError:
                    channel = self._transport.open_channel()
                local.channel = channel
            if timeout is not None:  # one deadline for the whole call: every fragment and callback shares it
                deadline = time.monotonic() + timeout
        healthy = False
        bulk = self.bulk
        try:
            reply = channel.exchange(frame, deadline)
            if bulk is not None and bulk.lent_slots:  # none lent anywhere: none of ours to free
                bulk.received(len(reply))
            value = plain_reply_value(reply)
            if value is not NOT_PLAIN:
                healthy = True
                return value
            value = codec.reference_in_reply(reply)
            if value is not NOT_A_REFERENCE:
                healthy = True
                return value
            while self._inline is None and frame_kind(reply) == Kind.CALL:  # the peer calls back mid-call
                reply = channel.exchange(self.dispatch(reply), deadline)
                if bulk is not None:
                    bulk.received(len(reply))
            if bulk is not None:
                bulk.bound(len(reply))
            result = decode_frame(codec, reply)
            healthy = True
        except (PeerGone, CallTimeout, ChannelClosed, ReplyTooLarge) as failure:
            raise self._failed(failure, op, target, name, timeout) from None
        finally:
            if bulk is not None and not healthy:
                bulk.received()  # what this call lent is not waited for any more
            if outermost:
                local.channel = None
                if healthy and not self.closed:
                    self._free.append(channel)
                else:  # state unknown after an error mid-exchange: never reuse the channel
                    channel.close()
        return self._answer(result)

    def _failed(
        self, failure: BaseException, op: int, target: int | str, name: str | None, timeout: float | None
    ) -> BaseException:
        """What a call raises when its exchange failed with ``failure`` (PeerGone, CallTimeout,
        ChannelClosed or ReplyTooLarge)."""
        if isinstance(failure, PeerGone):
            self.closed = True
            ended = self.closed_error()
            if isinstance(ended, CompartmentCrashed):
                ended.add_note(f"the call it was serving: {self._running(op, target, name)}")
            return ended
        if isinstance(failure, CallTimeout):
            self.closed = True
            self._transport.abort()
            ended = self.closed_error()
            return CompartmentCrashed(
                self.peer,
                getattr(ended, "returncode", None),
                f"no answer within its timeout of {timeout} s, so it was ended",
            )
        if isinstance(failure, ChannelClosed):
            return ProtocolError(f"compartment {self.peer!r} dropped the call without answering")
        return ReplyTooLarge(f"compartment {self.peer!r}: {failure}")

    def _answer(self, result: list[Any]) -> Any:
        """What a call returns (or raises) for the peer's decoded answer frame ``result``."""
        kind = result[KIND]
        if kind == Kind.REPLY:
            if result[REPLY_RELEASES]:
                self.exports.release(result[REPLY_RELEASES])
            return result[REPLY_VALUE]
        if kind == Kind.ERROR:
            if result[ERROR_RELEASES]:
                self.exports.release(result[ERROR_RELEASES])
            exc = result[ERROR_EXCEPTION]
            remote_traceback = result[ERROR_TRACEBACK]
            if remote_traceback and not self.codec.is_own_exception(exc):
                # Unbound: the instance's own attributes come from the peer. Setting the cause
                # also suppresses the context (this frame's, which says nothing).
                _SET_CAUSE(exc, RemoteTraceback(self.peer, remote_traceback))
            raise exc
        raise ProtocolError("compartment answered a call with a call frame")

    def _running(self, op: int, target: int | str, name: str | None) -> str:
        """The call a compartment died serving, named as the app wrote it where known
        (``crashy.segv()``, ``CALL_METHOD 'execute' of object 12 (a Cursor)``)."""
        held = self.imports.peek(target) if isinstance(target, int) else None
        what = None if held is None else f"a {type(held).__qualname__}"
        described = describe_call(op, target, name, what)
        function = self.module_functions.get(target) if isinstance(target, int) else None
        if function is not None and op == Op.CALL:
            return f"{function.__module__}.{function.__name__}() ({described})"
        if isinstance(target, str) and name:  # a module's attribute, by name
            return f"{target}.{name} ({described})"
        return described

    def closed_error(self) -> BaseException:
        """What a call on this closed link raises: the transport says why the peer is gone."""
        return self._transport.death()

    def forget(self) -> None:
        """After a fork: this process must never use the parent's channels, nor close them."""
        self.closed = True
        self._free.clear()
        if self.bulk is not None:  # the parent's arenas: never written from here
            self.bulk = None
            self.codec.stop_lending()
        reason = (
            f"this object lives in compartment {self.peer!r} of the process this one was forked from; "
            "a forked process reaches its own instance of that compartment through the module again"
        )
        self._transport = DeadTransport(lambda: FlexosError(reason))

    # -- serving the peer ---------------------------------------------------------------------
    def serve(self, channel: ServedChannel) -> None:
        """Serve calls arriving on ``channel`` until the peer closes it (a worker thread's loop)."""
        self._local.channel = channel
        deferred: Releases = []
        bulk = self.bulk
        try:
            frame = channel.recv()
            while True:
                if bulk is not None and bulk.lent_slots:  # dispatch() bounds what the frame may lend
                    bulk.received(len(frame))
                reply = self.dispatch(frame, deferred)
                if deferred:  # free what the peer dropped while it reads our reply
                    channel.send(reply)
                    self._release_unserved(deferred)
                    frame = channel.recv()
                else:
                    frame = channel.exchange(reply)
        except (PeerGone, ChannelClosed, ProtocolError, OSError, ValueError):
            pass  # the peer went away or broke the conversation: this channel is done
        finally:
            if bulk is not None:
                bulk.received()
            channel.close()  # on any exit, so that a caller waiting on it is told

    def _release_unserved(self, deferred: Releases) -> None:
        """Apply releases between two calls of the peer on this serving thread's channel: the
        peer is not waiting on it, so a call that freeing makes (a weakref callback hashing a
        proxy key, a ``__del__``) must go out as an outermost call, on a channel of its own. The
        reply just sent may still be read: its bulk slots wait for this channel's next frame, not
        for the answer to such a call."""
        local = self._local
        served = local.channel
        local.channel = None
        lent = self.bulk.set_aside() if self.bulk is not None else None
        try:
            self.exports.release(deferred)
        finally:
            local.channel = served
            deferred.clear()
            if lent and self.bulk is not None:
                self.bulk.restore(lent)

    def dispatch(self, data: bytes, deferred: Releases | None = None) -> bytes:
        """Run one call from the peer and return the reply frame; raises only ReplyTooLarge.

        Releases piggybacked on the call go to ``deferred`` when given, for the caller to apply
        after sending the reply (counts are additive, so applying them late is safe).
        """
        codec = self.codec
        imports = self.imports
        try:
            # A plain CALL frame (all plain values, valid as decode_frame would have it): of a handle
            # we exported, called and answered in C as _execute's first case does (bytes); else
            # its result to encode, or its fields for _execute (and its releases, if it carries
            # some). None: the Python path below.
            served = plain_serve_call(
                data, self._exported if self._plain_execute else None, NO_KWARGS, imports.dying, codec.raw_limit
            )
            if served is not None:
                if type(served) is bytes:
                    return served
                if len(served) == 6:  # a plain call carrying releases: applied as the path below does
                    op, target, name, args, kwargs, releases = served
                    if deferred is None:
                        self.exports.release(releases)
                    else:
                        deferred.extend(releases)
                    result = self._execute(op, target, name, args, kwargs)
                else:
                    result = served[0] if len(served) == 1 else self._execute(*served)
                releases = imports.take_releases() if imports.dying else _NO_RELEASES
                reply = plain_reply_frame(result, releases, codec.raw_limit)
                if reply is None and not releases:  # an object by reference, the next most common
                    reply = codec.reference_reply(result)
                return reply if reply is not None else encode_reply(codec, result, releases)
        except BaseException as exc:  # everything, including SystemExit, belongs to the caller
            return encode_error(codec, exc, imports.take_releases(), with_traceback=type(exc) is not StopIteration)
        if self.bulk is not None:
            self.bulk.bound(len(data))
        try:
            call = decode_frame(codec, data)
        except ReplyTooLarge:  # its buffers are over the bound: refused whole, as the transport
            raise  # refuses a frame over it, so the caller drops the channel and names the peer
        except BaseException as exc:
            return encode_error(codec, exc, imports.take_releases())
        try:
            if call[KIND] != Kind.CALL:
                raise ProtocolError("expected a call frame")
            releases = call[CALL_RELEASES]
            if releases:
                if deferred is None:
                    self.exports.release(releases)
                else:
                    deferred.extend(releases)
            result = self._execute(
                call[CALL_OP], call[CALL_TARGET], call[CALL_NAME], call[CALL_ARGS], call[CALL_KWARGS]
            )
            return encode_reply(codec, result, imports.take_releases() if imports.dying else _NO_RELEASES)
        except BaseException as exc:  # everything, including SystemExit, belongs to the caller
            return encode_error(codec, exc, imports.take_releases(), with_traceback=type(exc) is not StopIteration)

    def _execute(self, op: int, target: int | str, name: str | None, args: list[Any], kwargs: dict[str, Any]) -> Any:
        if type(target) is int:
            entry = self.exports.objects.get(target)
            if entry is None:
                raise ProtocolError(f"compartment named handle {target}, which it does not hold")
            obj = entry[0]
            if op == Op.CALL:
                return obj(*args, **kwargs)
            if op == Op.CALL_METHOD:
                return getattr(obj, self._readable(obj, name))(*args, **kwargs)
            if op == Op.GETATTR:
                value = getattr(obj, self._readable(obj, name))
                live = type(value) in _LIVE_STATE and self.peer_is_app
                if live and getattr(type(obj), "_flexos_app_subclass", False):
                    return ByReference(value)  # the app's methods mutate the instance's own state
                return value
            if op == Op.OPERATOR:
                function = FUNCTIONS.get(name) if name is not None else None
                if function is None:
                    raise ProtocolError(f"unknown operator {name!r}")
                if name == "pickle" and not self.peer_is_app:
                    raise TypeError(
                        f"compartment {self.peer!r} may not pickle this side's objects (a pickle holds an "
                        "object's whole state): it uses the copy protocols their classes define"
                    )
                return function(obj, *args)
            if op == Op.SETATTR:
                if len(args) != 1:
                    raise ProtocolError("setattr takes one value")
                setattr(obj, self._writable(obj, name), args[0])
                return None
            if op == Op.DELATTR:
                delattr(obj, self._writable(obj, name))
                return None
            if op == Op.SUPER:
                return self._call_base(obj, name, args, kwargs)
            if op == Op.SUBCLASS:
                if not self.peer_is_app:
                    raise TypeError(
                        f"compartment {self.peer!r} may not derive classes from this side's classes: "
                        "only the app, the principal, may (a subclass would run its code here)"
                    )
                if len(args) != 4:
                    raise ProtocolError("malformed subclass request")
                return self.export_class(build_subclass(name, *args))
            if op == Op.DESCRIBE:
                cls = described_class(obj) if type(obj) is Described else obj
                if not isinstance(cls, type):
                    raise ProtocolError("describe needs a class handle")
                return describe_class(cls, reachable_by_name, private=self._private_methods, containers=self.app_side)
        elif op == Op.IMPORT and type(target) is str:  # always a str here: decode_frame admits int or str
            if self._import is None:
                raise ImportError(f"compartment {self.peer!r} may not import from here")
            module = self._import(target)  # a module, or the gate to one (a strict fcalls module)
            names = getattr(module, "__all__", None)
            if names is None:
                names = [n for n in dir(module) if not n.startswith("_")]
            # The gate's own handle on the module: the one module that crosses by reference.
            return import_answer(ByReference(module), isinstance(getattr(module, "__path__", None), list), list(names))
        if op == Op.UNPICKLE:
            if not self.peer_is_app:
                raise TypeError(f"compartment {self.peer!r} may not have this side unpickle anything")
            if len(args) != 1 or type(args[0]) is not bytes:
                raise ProtocolError("unpickle takes the bytes of one pickle")
            import pickle  # only on this path

            return pickle.loads(args[0])  # what this side pickled of its own object, the app says
        raise ProtocolError(f"operation {op} does not take target {target!r}")

    def _call_base(self, obj: Any, name: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """``super().name(*args)`` as the app's subclass means it: ``base``'s own method, on ``obj``."""
        if not self.peer_is_app:
            raise TypeError(f"compartment {self.peer!r} may not call base-class methods on this side's objects")
        if not args or not isinstance(args[0], type):
            raise ProtocolError("malformed base-class call")
        base, *rest = args
        mro = type(obj).__mro__
        if base not in mro:
            raise TypeError(f"a {type(obj).__name__} is not an instance of {base.__name__}")
        if name != "__init__":
            self._readable(obj, name)
        position = mro.index(base)
        target = super(mro[position - 1], obj) if position else obj
        return getattr(target, name)(*rest, **kwargs)

    def adopt_class(self, handle: int, cls: type) -> None:
        """``cls`` stands for the peer's class ``handle`` (an app's subclass the peer made for it)."""
        with self._class_lock:
            self._classes[handle] = cls

    # -- ReferenceSpace -------------------------------------------------------------------------
    def export(self, obj: Any) -> int:
        return self.exports.export(obj)

    def export_class(self, cls: type) -> int:
        # Peers keep their mirrors of our classes for good, so a class handle is exported once
        # and pinned: no lock and no count on the hot path. A peer other than the app may only
        # describe it until a value grants it.
        handle = self._class_handles.get(cls)
        if handle is None:
            with self._export_lock:
                handle = self._class_handles.get(cls)
                if handle is None:
                    entry = cls if self.peer_is_app else Described(cls)
                    handle = self._class_handles[cls] = self.exports.pin(entry)
        return handle

    def grant_class(self, cls: type) -> int:
        handle = self.export_class(cls)
        if not self.peer_is_app:
            with self._export_lock:
                granted = self._grants.get(cls, 0)
                self._grants[cls] = granted + 1
                entry = self.exports.objects.get(handle)
                if not granted and entry is not None:
                    entry[0] = cls
        return handle

    def withdraw(self, exported: list[Any]) -> None:
        releases = []
        for item in exported:
            if type(item) is int:
                releases.append([item, 1])
            elif not self.peer_is_app:  # a class a failed encoding granted
                with self._export_lock:
                    granted = self._grants[item] - 1
                    self._grants[item] = granted
                    entry = self.exports.objects.get(self._class_handles[item])
                    if not granted and entry is not None:
                        entry[0] = Described(item)
        if releases:
            self.exports.release(releases)

    def is_proxy_type(self, cls: type) -> bool:
        return issubclass(cls, (RemoteObject, RemoteValue, ModuleFunction))

    def peer_handle(self, obj: Any) -> int | None:
        if isinstance(obj, (RemoteObject, RemoteValue)):
            return obj._flexos_handle if obj._flexos_link is self else None
        if isinstance(obj, ModuleFunction):  # a module function goes home as the function itself
            function = obj._flexos_bound
            return function._flexos_handle if function._flexos_link is self else None
        if isinstance(obj, type):
            attrs = obj.__dict__
            if attrs.get("_flexos_class_link") is self:
                return attrs["_flexos_class_handle"]
        return None

    def resolve(self, handle: int) -> Any:
        obj = self.exports.get(handle)
        return described_class(obj) if type(obj) is Described else obj

    def module(self, name: str) -> types.ModuleType:
        """Our own module ``name``, or our gate to it: a module never crosses by reference, so
        walking its globals never leads into the sender's modules. On a compartment's word we
        import only what the image places somewhere (which gives a gate, or a module placed here),
        never an unlisted module (it would run here whatever file it names); on the app's, any."""
        module = sys.modules.get(name)
        if module is None:
            if self._replicated(name) and not self.peer_is_app:
                raise GateError(
                    f"compartment {self.peer!r} sent module {name!r}, which is not loaded here, and flexos never "
                    "imports a module because another compartment named it"
                )
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise GateError(
                    f"compartment {self.peer!r} sent module {name!r}, which cannot be imported here: {exc}"
                ) from None
        return module

    def borrow(self, payload: bytes) -> Any:
        """A buffer the peer lent us beside the frame: through our bulk port, or the transport's
        own loans (same-process transports)."""
        if self.bulk is not None:
            return self.bulk.borrow(payload)
        borrow = getattr(self._transport, "borrow", None)
        if borrow is None:
            raise ProtocolError("compartment sent a buffer loan over a transport that cannot carry one")
        return borrow(payload)

    def proxy(self, handle: int, class_handle: int) -> Any:
        cls = self._classes.get(class_handle) or self._mirror(class_handle)
        if not issubclass(cls, RemoteObject):  # an exception class: its instances cross by value
            raise ProtocolError("object reference names a class that cannot have proxies")
        return self.imports.lookup_or_create(handle, new_proxy, cls, self, handle)

    def value_proxy(self, handle: int, class_handle: int, value: Any) -> Any:
        cls = self._classes.get(class_handle) or self._mirror(class_handle)
        builtin = getattr(cls, "_flexos_value", None)
        if builtin is not type(value):
            raise ProtocolError("value reference names a class that is no subclass of the value's type")
        container = builtin is dict or builtin is list
        if container and not self.peer_is_app:
            raise ProtocolError(f"compartment {self.peer!r} sent a container copy: only the app's cross as copies")
        proxy = self.imports.lookup_or_create_value(handle, lambda: new_value_proxy(cls, self, handle, value))
        if container and isinstance(proxy, builtin):  # (not a proxy made when it crossed by reference)
            refill_container(proxy, value)  # the contents as they are now, each time it crosses
        return proxy

    def proxy_class(self, handle: int, module: str, qualname: str) -> type:
        """A class value from the peer: a mirror, whose calls run in the peer. Only an exception
        class of a replicated module is our own class (what ``except`` needs; building an exception
        runs nothing that matters): any other class of the peer's, say ``subprocess.Popen``,
        would run here with our authority what the peer meant to run in its own (a confused deputy)."""
        if module and self._replicated(module):
            cls = _local_class(module, qualname)
            if cls is not None and issubclass(cls, BaseException):
                return cls
        return self._classes.get(handle) or self._mirror(handle)

    def _mirror(self, handle: int) -> type:
        with self._class_lock:
            cls = self._classes.get(handle)
            if cls is None:
                try:
                    desc = checked_description(self.call(Op.DESCRIBE, handle))
                except GateError as refused:  # its own refusal (the handle is no class of its): a bad reference
                    raise ProtocolError(
                        f"compartment {self.peer!r} sent a class it cannot describe: {refused}"
                    ) from None
                cls = mirror_class(self, handle, desc, self._mirrors)
                self._classes[handle] = cls
            return cls

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
        while self._free:
            self._free.pop().close()
        self.exports.clear()
        if self.bulk is not None:
            self.bulk.close()
