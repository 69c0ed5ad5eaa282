"""Gate statistics (``flexos run --stats``): what the app's gates carried, counted where it is cheap.

Off by default and then free: :func:`enable` only makes the links created afterwards counting
ones. A counting link wraps, on the instance, its ``call`` (the app's calls into the compartment),
its ``dispatch`` and ``_execute`` (the compartment's calls back into the app, served here), its
``serve`` and its transport's channels (the frames each way); a link made while counting is off
has none of this, so its calls run exactly the code they run without statistics.

Only the app counts: a link whose peer is the app (a compartment's, or the compartment side of
strict fcalls in the app's process) is never wrapped, so each crossing is counted once, by the
caller's side for calls and by the serving side for callbacks. Each thread counts into a tally of
its own (no lock, exact counts); :func:`snapshot` adds them up.

Time is wall time around the gate, the compartment's own work included (what the app waits for);
a compartment's ``seconds`` counts only calls that are not nested in another gate call on the same
thread, so that their sum is the app's time in gates. A target's figures include what its
callbacks carried and took. Bytes are the frames' (a buffer lent without a copy counts as its
loan record).

flexos's own crossings (its interpreter-state module, ``flexos.runtime.state``, imported and
installed in each compartment it starts; the class descriptions a peer asks for to mirror a class)
are counted like the app's, in every total, and flagged (:attr:`TargetStats.flexos`, see
:func:`flexos_own`) so that a report can keep them apart from the app's own calls.
"""

from __future__ import annotations

import threading
import time
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flexos.wire.codec import Described, described_class
from flexos.wire.frames import Op

if TYPE_CHECKING:
    from flexos.gates.link import Link
    from flexos.transports import Channel, ServedChannel, Transport

_OP_LABELS = {
    Op.GETATTR: "get",
    Op.SETATTR: "set",
    Op.DELATTR: "del",
    Op.DESCRIBE: "describe",
    Op.SUPER: "super",
    Op.SUBCLASS: "subclass",
}


class _Tally:
    """One thread's counts for one peer compartment."""

    __slots__ = ("callback_seconds", "callback_targets", "callbacks", "calls", "received", "seconds", "sent", "targets")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.callbacks = 0
        self.callback_seconds = 0.0
        self.sent = 0
        self.received = 0
        self.targets: dict[str, list[Any]] = {}  # label -> [calls, seconds, sent, received]
        self.callback_targets: dict[str, list[Any]] = {}


class _Thread(threading.local):
    depth = 0  # gate calls and served callbacks this thread is inside
    serving: str | None = None  # the label of the callback being executed
    generation = -1  # of the tallies below: each enable() starts a new one

    def __init__(self) -> None:
        self.tallies: dict[str, _Tally] = {}


@dataclass
class TargetStats:
    """One function, method or operation reached through a gate."""

    target: str
    calls: int
    seconds: float
    sent_bytes: int
    received_bytes: int
    flexos: bool = False  # flexos's own crossing, not one the app's code made (see flexos_own)


@dataclass
class GateStats:
    """What the app's gates to one compartment carried, its restarts included."""

    calls: int = 0
    seconds: float = 0.0
    callbacks: int = 0
    callback_seconds: float = 0.0
    sent_bytes: int = 0
    received_bytes: int = 0
    targets: list[TargetStats] = field(default_factory=list)  # the app's calls, most called first
    callback_targets: list[TargetStats] = field(default_factory=list)  # the compartment's calls back


_thread = _Thread()
_lock = threading.Lock()
_tallies: list[tuple[str, _Tally]] | None = None  # every thread's, by peer; None: not counting
_generation = 0


def enable() -> None:
    """Count on every link made from now on (and forget earlier counts)."""
    global _tallies, _generation
    with _lock:
        _tallies = []
        _generation += 1


def disable() -> None:
    """Make no more counting links (those made meanwhile still count)."""
    global _tallies
    _tallies = None


def enabled() -> bool:
    """Whether links made now count (a link asks once, when it is made)."""
    return _tallies is not None


def _tally(peer: str) -> _Tally:
    here = _thread
    if here.generation != _generation:
        here.tallies = {}
        here.generation = _generation
    tally = here.tallies.get(peer)
    if tally is None:
        tally = here.tallies[peer] = _Tally()
        with _lock:
            if _tallies is not None:
                _tallies.append((peer, tally))
    return tally


def snapshot() -> dict[str, GateStats]:
    """The counts so far, per peer compartment."""
    with _lock:
        every = list(_tallies or [])
    totals: dict[str, GateStats] = {}
    targets: dict[str, dict[str, list[Any]]] = {}
    callbacks: dict[str, dict[str, list[Any]]] = {}
    for peer, tally in every:
        total = totals.setdefault(peer, GateStats())
        total.calls += tally.calls
        total.seconds += tally.seconds
        total.callbacks += tally.callbacks
        total.callback_seconds += tally.callback_seconds
        total.sent_bytes += tally.sent
        total.received_bytes += tally.received
        for mine, theirs in (
            (targets.setdefault(peer, {}), tally.targets),
            (callbacks.setdefault(peer, {}), tally.callback_targets),
        ):
            for label, counts in list(theirs.items()):
                merged = mine.setdefault(label, [0, 0.0, 0, 0])
                for i, value in enumerate(counts):
                    merged[i] += value
    for peer, total in totals.items():
        total.targets = _ranked(targets[peer])
        total.callback_targets = _ranked(callbacks[peer])
    return totals


def _ranked(targets: dict[str, list[Any]]) -> list[TargetStats]:
    rows = [
        TargetStats(label, calls, seconds, sent, received, flexos_own(label))
        for label, (calls, seconds, sent, received) in targets.items()
    ]
    rows.sort(key=lambda row: (-row.calls, -row.seconds, row.target))
    return rows


# -- naming what a call reaches ---------------------------------------------------------------------
_LABELS_KEPT = 4096  # labels a link remembers per direction (handles are never reused; new ones keep coming)


def flexos_own(label: str) -> bool:
    """Whether a target's label names a crossing flexos makes for itself: a class description
    (mirroring a class, either way) or a call to, or import of, flexos's own code."""
    subject = label.removeprefix("import ")
    return label.startswith("describe ") or subject == "flexos" or subject.startswith("flexos.")


def _name_of(obj: Any) -> str:
    """A local object as a person names it: ``module.function``, or its class's name."""
    if isinstance(obj, types.MethodType):
        obj = obj.__func__
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f"{obj.__module__}.{obj.__qualname__}"
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}" if cls.__module__.startswith("flexos.") else cls.__qualname__


def _label(subject: str, op: int, name: str | None) -> str:
    if op == Op.DESCRIBE:
        return f"describe {subject}"
    if op == Op.CALL:
        return subject
    if op == Op.CALL_METHOD:
        return f"{subject}.{name}"
    if op == Op.OPERATOR:
        return f"{subject} <{name}>"
    if op == Op.IMPORT:
        return f"import {subject}"
    return f"{subject}.{name} ({_OP_LABELS.get(op, op)})" if name else f"{subject} ({_OP_LABELS.get(op, op)})"


class _Names:
    """What the app's handles on one compartment's objects stand for, learnt from the calls that
    handed them out (an import names a module, reading a module's attribute names a function)."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self.known: dict[int, str] = {}
        self._labels: dict[tuple[int, int | str, str | None], str] = {}  # handles are never reused

    def label(self, op: int, target: int | str, name: str | None) -> str:
        key = (op, target, name)
        label = self._labels.get(key)
        if label is None:
            if len(self._labels) >= _LABELS_KEPT:
                self._labels.clear()
            label = self._labels[key] = _label(self._subject(op, target), op, name)
        return label

    def _subject(self, op: int, target: int | str) -> str:
        if isinstance(target, str):
            return target
        known = self.known.get(target)
        if known is not None:
            return known
        link = self._link
        if op == Op.DESCRIBE:  # a class handle not mirrored yet: what it is, its description says
            return "a class"
        cls = link._classes.get(target)  # a class of the compartment's: calling it makes an instance
        if cls is not None:
            return f"{cls.__module__}.{cls.__qualname__}"
        held = link.imports.peek(target)
        return type(held).__qualname__ if held is not None else f"object {target}"

    def learn(self, op: int, target: int | str, name: str | None, result: Any) -> None:
        """Name what an import or a module attribute handed out."""
        if op == Op.IMPORT and isinstance(target, str) and isinstance(result, list) and result:
            handle = getattr(result[0], "_flexos_handle", None)
            if isinstance(handle, int):
                self.known[handle] = target
        elif op == Op.GETATTR and isinstance(target, int) and target in self.known:
            handle = getattr(result, "_flexos_handle", None)
            if isinstance(handle, int) and getattr(result, "_flexos_link", None) is self._link:
                self.known.setdefault(handle, f"{self.known[target]}.{name}")


# -- counting links -------------------------------------------------------------------------------
def _count(counts: dict[str, list[Any]], label: str, seconds: float, sent: int, received: int) -> None:
    row = counts.get(label)
    if row is None:
        counts[label] = [1, seconds, sent, received]
    else:
        row[0] += 1
        row[1] += seconds
        row[2] += sent
        row[3] += received


class _CountingChannel:
    """A channel of a counting link: adds each frame's size to this thread's tally."""

    def __init__(self, channel: Any, peer: str) -> None:
        self._channel = channel
        self._peer = peer

    def exchange(self, frame: bytes, deadline: float | None = None) -> bytes:
        tally = _tally(self._peer)
        tally.sent += len(frame)
        reply = self._channel.exchange(frame, deadline)
        tally.received += len(reply)
        return reply

    def send(self, frame: bytes) -> None:
        _tally(self._peer).sent += len(frame)
        self._channel.send(frame)

    def recv(self) -> bytes:
        frame = self._channel.recv()
        _tally(self._peer).received += len(frame)
        return frame

    def close(self) -> None:
        self._channel.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class _CountingTransport:
    """A counting link's transport: hands out counting channels, is the transport otherwise."""

    def __init__(self, transport: Transport, peer: str) -> None:
        self._transport = transport
        self._peer = peer

    def open_channel(self) -> Channel:
        return _CountingChannel(self._transport.open_channel(), self._peer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def instrument(link: Link) -> None:
    """Make ``link`` (the app's, to a compartment) count its calls, callbacks and frames."""
    peer = link.peer
    names = _Names(link)
    callback_labels: dict[tuple[int, int | str, str | None], str] = {}  # the app's handles are never reused
    plain_call = link.call
    plain_dispatch = link.dispatch
    plain_execute = link._execute
    plain_serve = link.serve
    plain_attach = link.attach
    clock = time.perf_counter

    def call(op: int, target: int | str, name: str | None = None, args: Any = (), kwargs: Any = None) -> Any:
        here = _thread
        tally = _tally(peer)
        depth = here.depth
        sent, received = tally.sent, tally.received
        here.depth = depth + 1
        started = clock()
        try:
            result = plain_call(op, target, name, args, kwargs)
        finally:
            seconds = clock() - started
            here.depth = depth
            tally.calls += 1
            if not depth:
                tally.seconds += seconds
            label = names.label(op, target, name)
            _count(tally.targets, label, seconds, tally.sent - sent, tally.received - received)
        if op == Op.IMPORT or op == Op.GETATTR:
            names.learn(op, target, name, result)
        return result

    def dispatch(data: bytes, deferred: Any = None) -> bytes:
        here = _thread
        tally = _tally(peer)
        depth, serving = here.depth, here.serving
        here.depth = depth + 1
        here.serving = None
        started = clock()
        try:
            reply = plain_dispatch(data, deferred)
        finally:
            seconds = clock() - started
            label = here.serving or "(refused)"
            here.depth, here.serving = depth, serving
        if link._inline is not None:  # the peer calls us on its own stack: no channel of ours saw these
            tally.received += len(data)
            tally.sent += len(reply)
        tally.callbacks += 1
        if not depth:
            tally.callback_seconds += seconds
        _count(tally.callback_targets, label, seconds, len(reply), len(data))
        return reply

    def execute(op: int, target: int | str, name: str | None, args: list[Any], kwargs: dict[str, Any]) -> Any:
        key = (op, target, name)
        label = callback_labels.get(key)
        if label is None:
            entry = link.exports.objects.get(target) if isinstance(target, int) else None
            subject = target if isinstance(target, str) else _name_of(entry[0]) if entry is not None else "?"
            if op == Op.DESCRIBE and entry is not None and type(entry[0]) is Described:
                subject = _name_of(described_class(entry[0]))
            label = _label(subject, op, name)
            if entry is not None or isinstance(target, str):  # a handle not exported yet may be later
                if len(callback_labels) >= _LABELS_KEPT:
                    callback_labels.clear()
                callback_labels[key] = label
        _thread.serving = label
        return plain_execute(op, target, name, args, kwargs)

    def serve(channel: ServedChannel) -> None:
        plain_serve(_CountingChannel(channel, peer))  # type: ignore[arg-type]

    def attach(transport: Transport) -> None:
        plain_attach(_CountingTransport(transport, peer))  # type: ignore[arg-type]

    link.call = call  # type: ignore[method-assign]
    link.dispatch = dispatch  # type: ignore[method-assign]
    link._execute = execute  # type: ignore[method-assign]
    link._plain_execute = False  # every call the peer makes goes through execute, to be labelled
    link.serve = serve  # type: ignore[method-assign]
    link.attach = attach  # type: ignore[method-assign]
