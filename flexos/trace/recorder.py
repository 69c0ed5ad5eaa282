"""The learning run: the app runs as ``python`` would run it, with no isolation, and every unit's
behaviour is recorded.

``python -m flexos.trace OUT.json [-m MODULE | SCRIPT] [ARGS]...`` (what ``flexos trace`` starts,
so that the app gets a fresh interpreter) runs the app and writes what it saw to ``OUT.json``:

- calls that cross from one unit to another (``sys.monitoring``, PEP 669): Python functions by
  ``PY_START`` (a code object of the standard library is disabled at its first call and costs
  nothing after), C functions by the ``CALL`` events of unit code; counts per edge and an
  estimate of the bytes a gate would carry, per call site;
- audit events (PEP 578): files and directories opened (read, write, created), sockets (family,
  address), processes spawned, and every other event's count;
- environment variables read (``os.environ``'s lookups);
- modules imported (and by which unit, where), and which are C extensions.

Each observation is attributed the way ``flexos.hardening``'s audit policy attributes events
(:func:`flexos.hardening.acting_frames`), recording the whole chain of units on the stack,
innermost first: the proposal later decides which of them holds a compartment. A C function has
no frame, so while a unit's code calls a C function of another unit that unit is put innermost.

Standard library only (plus flexos.hardening): this runs inside the app's interpreter.
"""

from __future__ import annotations

import os
import resource
import runpy
import signal
import statistics
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flexos.hardening import acting_frames, always_readable
from flexos.trace.units import MAIN, TRACE_COMPONENTS, Units, is_extension

RECORD_VERSION = 2
_CHAIN_LENGTH = 8  # units kept per observation, innermost first
_SITES_PER_KEY = 5  # call sites kept per edge
# sys._getframe(_EVENT) in a callback's body is the code the event is about (1 is the timing wrapper).
_EVENT = 2
_EXACT_CALLS, _SAMPLE = 100, 10  # an edge's first calls are all measured, then one in _SAMPLE
_TIMED_EVERY = 61  # prime: a loop of a few events in turn gets each of them timed alike
# Audit events never counted: raised by the recorder itself on every call it sees, or by every import.
_UNCOUNTED = frozenset(
    {"sys._getframe", "sys._getframemodulename", "object.__getattr__", "object.__setattr__", "object.__delattr__"}
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_C_CALLABLES = frozenset(
    {
        types.BuiltinFunctionType,
        types.MethodDescriptorType,
        types.WrapperDescriptorType,
        types.MethodWrapperType,
        types.ClassMethodDescriptorType,
    }
)
_BUILTINS = sys.modules["builtins"]
_FUNCTION, _METHOD = types.FunctionType, types.MethodType
_NOTHING_EXPECTED: tuple[str | None, types.CodeType | None, int] = (None, None, 0)


def wire_size(value: Any, depth: int = 0) -> int:
    """About how many bytes a gate carries for ``value``: builtin values are copied (their size),
    any other object crosses by reference (a handle)."""
    kind = type(value)
    if kind is bytes or kind is str or kind is bytearray:
        return len(value) + 5
    if kind is int or kind is float:
        return 9
    if value is None or kind is bool:
        return 1
    if kind is memoryview:
        return value.nbytes + 5
    if kind is dict:
        items = list(value.items())
        return 5 + _sampled(len(items), items, depth, pairs=True)
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return 5 + _sampled(len(value), list(value), depth, pairs=False)
    return 16


def _sampled(count: int, items: list, depth: int, pairs: bool) -> int:
    if count == 0:
        return 0
    if depth >= 4:
        return 16 * count
    sample = items[:64]
    if pairs:
        total = sum(wire_size(k, depth + 1) + wire_size(v, depth + 1) for k, v in sample)
    else:
        total = sum(wire_size(item, depth + 1) for item in sample)
    return total * count // len(sample)


class _File:
    """What the recorder knows of one source file's code: its unit, and which of its functions
    were entered from another unit (by qualified name: their activations' edges, innermost last,
    None for an activation that was not a crossing; a return adds its value's bytes to the edge
    it pops)."""

    __slots__ = ("crossed", "unit")

    def __init__(self, unit: str | None) -> None:
        self.unit = unit
        self.crossed: dict[str, list[tuple[list, int] | None]] = {}


class Recorder:
    """Observes one run. ``start()`` before the app, ``stop()`` after; ``record()`` is the result.

    The callbacks are the run's overhead, and ``sys._getframe``, ``id()``, ``frame.f_code`` and
    ``function.__code__`` each raise an audit event (every audit hook runs for every event), while
    a code object's hash covers its whole bytecode. So the common case uses none of them: code is
    known by its file's name, and a ``CALL`` event in unit code says which function starts next
    and from where, so the ``PY_START`` that follows compares two units without a frame. Only a
    call from another unit, or from code the recorder does not watch (the standard library
    calling back), walks the stack.
    """

    def __init__(self) -> None:
        self.units = Units()
        self.active = False
        self._tool: int | None = None
        self._files: dict[str, _File] = {}
        self._callee_units: dict[Any, str | None] = {}  # a C function's owner -> its unit
        # What the last CALL in unit code starts: (qualified name, calling code, offset). Threads
        # share it: a switch between a CALL and its PY_START only sends that call the slow way.
        self._expect: tuple[str | None, types.CodeType | None, int] = _NOTHING_EXPECTED
        self._pending: tuple[types.CodeType | None, int, str] = (None, -1, "")  # the last C call across units
        self._busy: set[int] = set()  # threads inside the audit hook (events it raises are its own)
        # edge -> [calls, bytes in, bytes out, {(callee, caller file, caller function, offset): count},
        #          CPU seconds at its first call, at its last call]
        self.edges: dict[tuple[str, str], list] = {}
        self._site_codes: dict[tuple[str, str], types.CodeType] = {}  # to find a site's line at the end
        self.observed: dict[str, dict[tuple, list]] = {
            kind: {} for kind in ("files", "env", "sockets", "processes", "events")
        }
        self.imports: dict[str, tuple[tuple[str, ...], str | None]] = {}
        # What the recorder itself costs, so that the app's own CPU time can be told from the run's:
        # how many callbacks ran, and the CPU time of a sample of them.
        self.events = 0
        self.timed = 0.0
        self.timed_events = 0
        self._clock_cost = 0.0
        self.crossings = 0
        self._environ_patch: dict[str, Callable] = {}
        self.cpu_start = 0.0

    # -- attribution ---------------------------------------------------------------------------
    def chain(self, frame: types.FrameType | None) -> tuple[tuple[str, ...], str | None]:
        """The units on the stack from ``frame`` out, innermost first, and the innermost one's call site."""
        found: list[str] = []
        site = None
        pending_code, pending_offset, pending_unit = self._pending
        for module, component in acting_frames(frame, TRACE_COMPONENTS):
            code = component.f_code
            if site is None:
                site = f"{code.co_filename}:{component.f_lineno}"
            if code is pending_code and component.f_lasti == pending_offset:
                if not found or found[-1] != pending_unit:  # inside a C function of another unit
                    found.append(pending_unit)
            unit = self.units.of_module(module)
            if unit is not None and (not found or found[-1] != unit):
                found.append(unit)
                if len(found) >= _CHAIN_LENGTH:
                    break
        return tuple(found), site

    def _note(self, kind: str, key: tuple, frame: types.FrameType | None) -> None:
        chain, site = self.chain(frame)
        table = self.observed[kind]
        entry = table.get((*key, chain))
        if entry is None:
            table[(*key, chain)] = [1, site]
        else:
            entry[0] += 1

    def _file(self, code: types.CodeType, depth: int) -> _File:
        """The record of ``code``'s file, classified now if new (by the globals of the frame ``depth`` up)."""
        name = code.co_filename
        known = self._files.get(name)
        if known is not None:
            return known
        unit = self.units.of_module(sys._getframe(depth + 1).f_globals.get("__name__"))
        entry = _File(unit)
        if not name.startswith("<"):  # exec'd code ("<string>") is classified at each call, by its globals
            self._files[name] = entry
        return entry

    # -- sys.monitoring callbacks --------------------------------------------------------------
    def _on_call(self, code: types.CodeType, offset: int, function: Any, first: Any) -> Any:
        file = self._files.get(code.co_filename) or self._file(code, _EVENT)
        unit = file.unit
        if unit is None:
            return sys.monitoring.DISABLE  # a call site outside the units: never seen again
        kind = type(function)
        if kind is _FUNCTION:
            self._expect = (function.__qualname__, code, offset)
            return None
        self._expect = _NOTHING_EXPECTED
        key: Any
        if kind is _METHOD:
            method = function.__func__
            if type(method) is types.FunctionType:
                self._expect = (method.__qualname__, code, offset)
                return None
            owner = function.__self__  # a compiled method (Cython's): no frame will say where it goes
            key = owner if isinstance(owner, type) else type(owner)
        elif kind in _C_CALLABLES:
            owner = getattr(function, "__self__", None)
            if owner is _BUILTINS:
                return sys.monitoring.DISABLE  # len, isinstance ...: a name bound once, never another unit's
            key = function if owner is None else owner if isinstance(owner, type | types.ModuleType) else type(owner)
        elif isinstance(function, type):
            init = getattr(function, "__init__", None)
            if type(init) is types.FunctionType:
                self._expect = (init.__qualname__, code, offset)
                return None
            if type(getattr(function, "__new__", None)) is types.FunctionType:
                return None
            key = function
        elif isinstance(kind.__call__, types.FunctionType):
            return None  # an object with a Python __call__: its PY_START says where it goes
        else:
            key = function  # a compiled function (Cython's)
        try:
            callee = self._callee_units[key]
        except KeyError:
            callee = self._callee_units[key] = self.units.of_callable(function)
        except TypeError:  # unhashable
            return None
        if callee is None or callee == unit:
            return None
        self._pending = (code, offset, callee)
        edge, weight = self._edge(unit, callee, getattr(function, "__qualname__", "?"), code, offset)
        if weight and first is not sys.monitoring.MISSING:
            edge[1] += wire_size(first) * weight
        return None

    def _on_start(self, code: types.CodeType, offset: int) -> Any:
        file = self._files.get(code.co_filename) or self._file(code, _EVENT)
        unit = file.unit
        if unit is None:
            return sys.monitoring.DISABLE
        if code.co_name == "<module>":  # a module's body runs once, as its import: not a call
            return None
        expected, caller, caller_offset = self._expect
        if expected is not None:
            self._expect = _NOTHING_EXPECTED
            if expected == code.co_qualname and caller is not None:
                caller_file = self._files.get(caller.co_filename)
                caller_unit = caller_file.unit if caller_file is not None else None
                if caller_unit == unit:  # the common case: a call inside one unit
                    if file.crossed:
                        activations = file.crossed.get(code.co_qualname)
                        if activations is not None:
                            activations.append(None)
                    return None
                if caller_unit is not None:
                    self._cross(caller_unit, file, code, None, caller, caller_offset)
                    return None
        self._cross_from_stack(file, code, sys._getframe(_EVENT))
        return None

    def _on_resume(self, code: types.CodeType, offset: int) -> Any:
        file = self._files.get(code.co_filename)
        if file is not None and file.unit is not None:
            self._cross_from_stack(file, code, sys._getframe(_EVENT))
        return None

    def _cross_from_stack(self, file: _File, code: types.CodeType, frame: types.FrameType) -> None:
        """An activation whose caller the last CALL did not name: the innermost unit below it is,
        or the C function of another unit that unit's frame is calling (which calls back)."""
        pending_code, pending_offset, pending_unit = self._pending
        for module, component in acting_frames(frame.f_back, TRACE_COMPONENTS):
            caller = component.f_code
            if caller is pending_code and component.f_lasti == pending_offset:
                self._cross(pending_unit, file, code, frame, caller, pending_offset)
                return
            caller_unit = self.units.of_module(module)
            if caller_unit is not None:
                self._cross(caller_unit, file, code, frame, caller, component.f_lasti)
                return
        self._cross(MAIN, file, code, frame, None, 0)

    def _cross(
        self,
        caller_unit: str,
        file: _File,
        code: types.CodeType,
        frame: types.FrameType | None,
        caller: types.CodeType | None,
        caller_offset: int,
    ) -> None:
        """An activation of ``code`` from ``caller_unit``: a crossing, unless that is its own unit.
        ``frame`` is the activation's (None: called from :meth:`_on_start`, one more frame up)."""
        name = code.co_qualname
        activations = file.crossed.get(name)
        if caller_unit == file.unit:
            if activations is not None:
                activations.append(None)
            return
        self.crossings += 1
        edge, weight = self._edge(caller_unit, file.unit or MAIN, name, caller, caller_offset)
        if weight:
            if frame is None:
                frame = sys._getframe(_EVENT + 1)
            arguments = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 4) + bool(code.co_flags & 8)
            if arguments and frame.f_lasti <= 0:  # a first start: the arguments are the locals
                local = frame.f_locals
                edge[1] += weight * sum(wire_size(local.get(argument)) for argument in code.co_varnames[:arguments])
        if activations is None:
            activations = file.crossed[name] = []
            events = sys.monitoring.events
            sys.monitoring.set_local_events(
                self._tool,  # type: ignore[arg-type]
                code,
                events.PY_RETURN | events.PY_YIELD | events.PY_RESUME,
            )
        activations.append((edge, weight) if weight else None)

    def _edge(self, caller: str, callee: str, name: str, code: types.CodeType | None, offset: int) -> tuple[list, int]:
        """Count a call on its edge; the edge, and the weight its bytes are counted with (0: this
        call's bytes are not looked at: past the first calls of an edge, one in ten is, ten times)."""
        edge = self.edges.get((caller, callee))
        if edge is None:
            now = time.process_time()
            edge = self.edges[(caller, callee)] = [0, 0, 0, {}, now, now]
        calls = edge[0] = edge[0] + 1
        weight = 1 if calls <= _EXACT_CALLS else _SAMPLE if calls % _SAMPLE == 0 else 0
        if weight:
            edge[5] = time.process_time()
        site = (name, None, None, 0) if code is None else (name, code.co_filename, code.co_qualname, offset)
        sites = edge[3]
        if site in sites:
            sites[site] += 1
        elif len(sites) < _SITES_PER_KEY:
            sites[site] = 1
            if code is not None:
                self._site_codes[(code.co_filename, code.co_qualname)] = code
        return edge, weight

    def _on_return(self, code: types.CodeType, offset: int, value: Any) -> None:
        file = self._files.get(code.co_filename)
        activations = file.crossed.get(code.co_qualname) if file is not None else None
        if activations:
            crossing = activations.pop()
            if crossing is not None:
                crossing[0][2] += wire_size(value) * crossing[1]

    def _on_unwind(self, code: types.CodeType, offset: int, exception: BaseException) -> None:
        file = self._files.get(code.co_filename)
        if file is not None and file.crossed:
            activations = file.crossed.get(code.co_qualname)
            if activations:
                activations.pop()

    def _site_record(self, site: tuple, count: int) -> dict[str, Any]:
        """A site key of :meth:`_edge` as the record says it: what was called, from which line."""
        name, filename, function, offset = site
        code = self._site_codes.get((filename, function))
        line = None
        if code is not None:
            line = next((n for start, end, n in code.co_lines() if start <= offset < end), code.co_firstlineno)
        return {"callee": name, "file": filename, "line": line, "count": count}

    # -- audit events, the environment ----------------------------------------------------------
    def _on_audit(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        thread = threading.get_ident()
        if thread in self._busy:
            return
        self._busy.add(thread)
        try:
            frame = sys._getframe(_EVENT + 1)  # the code that raised it (below: the hook, the timing)
            handler = _HANDLERS.get(event)
            if handler is not None:
                handler(self, event, args, frame)
            elif event.startswith(("os.exec", "os.spawn")):
                _process(self, event, args, frame)
            self._note("events", (event,), frame)
        except Exception:  # an observation must never change what the app does
            pass
        finally:
            self._busy.discard(thread)

    def _env_read(self, key: Any, present: bool) -> None:
        thread = threading.get_ident()
        if not self.active or thread in self._busy:
            return
        self._busy.add(thread)
        try:
            name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            self._note("env", (name, present), sys._getframe(2))
        finally:
            self._busy.discard(thread)

    def _patch_environ(self) -> None:
        environ_type = type(os.environ)
        getitem, iterate = environ_type.__getitem__, environ_type.__iter__
        recorder = self

        def __getitem__(environ: Any, key: Any) -> Any:
            try:
                value = getitem(environ, key)
            except KeyError:
                recorder._env_read(key, False)
                raise
            recorder._env_read(key, True)
            return value

        def __iter__(environ: Any) -> Iterator:
            recorder._env_read("*", True)
            return iterate(environ)

        self._environ_patch = {"__getitem__": getitem, "__iter__": iterate}
        environ_type.__getitem__ = __getitem__  # type: ignore[method-assign]
        environ_type.__iter__ = __iter__  # type: ignore[method-assign]

    # -- start, stop ----------------------------------------------------------------------------
    def _callbacks(self) -> dict[int, Callable]:
        events = sys.monitoring.events
        return {
            events.PY_START: self._timed(self._on_start, 2),
            events.PY_RESUME: self._timed(self._on_resume, 2),
            events.PY_RETURN: self._timed(self._on_return, 3),
            events.PY_YIELD: self._timed(self._on_return, 3),
            events.PY_UNWIND: self._timed(self._on_unwind, 3),
            events.CALL: self._timed(self._on_call, 4),
        }

    def spent(self) -> float:
        """The CPU time the recorder's callbacks took, estimated from the timed sample (less what
        reading the clock itself takes)."""
        if not self.timed_events:
            return 0.0
        return max(0.0, self.timed / self.timed_events - self._clock_cost) * self.events

    def _timed(self, body: Callable, arguments: int) -> Callable:
        """``body`` counted, one call in :data:`_TIMED_EVERY` timed in CPU time (a thread's CPU
        clock is a system call: timing every event would double what the recorder costs), and
        never raising into the app. One wrapper per arity (packing ``*args`` would cost every
        event), each calling ``body`` from its own frame, so that ``_EVENT`` holds on both paths."""
        clock = time.thread_time
        recorder = self

        def two(a: Any, b: Any) -> Any:
            recorder.events += 1
            started = clock() if recorder.events % _TIMED_EVERY == 0 else 0.0
            try:
                return body(a, b)
            except Exception:  # whatever goes wrong in the recorder must not change what the app does
                return None
            finally:
                if started:
                    recorder.timed += clock() - started
                    recorder.timed_events += 1

        def three(a: Any, b: Any, c: Any) -> Any:
            recorder.events += 1
            started = clock() if recorder.events % _TIMED_EVERY == 0 else 0.0
            try:
                return body(a, b, c)
            except Exception:
                return None
            finally:
                if started:
                    recorder.timed += clock() - started
                    recorder.timed_events += 1

        def four(a: Any, b: Any, c: Any, d: Any) -> Any:
            recorder.events += 1
            started = clock() if recorder.events % _TIMED_EVERY == 0 else 0.0
            try:
                return body(a, b, c, d)
            except Exception:
                return None
            finally:
                if started:
                    recorder.timed += clock() - started
                    recorder.timed_events += 1

        wrappers: dict[int, Callable[..., Any]] = {2: two, 3: three, 4: four}
        return wrappers[arguments]

    def start(self) -> None:
        monitoring = sys.monitoring
        for tool in (monitoring.PROFILER_ID, 3, 4):
            try:
                monitoring.use_tool_id(tool, "flexos trace")
            except ValueError:
                continue
            self._tool = tool
            break
        else:
            raise RuntimeError("flexos trace: every sys.monitoring tool id it could use is taken")
        for event, callback in self._callbacks().items():
            monitoring.register_callback(self._tool, event, callback)
        uncounted, observe = _UNCOUNTED, self._timed(self._on_audit, 2)

        def audit_hook(event: str, args: tuple) -> None:  # runs for every event: the filter first
            if event not in uncounted:
                observe(event, args)

        sys.addaudithook(audit_hook)  # cannot be removed: ``active`` turns it off
        self._patch_environ()
        clock = time.thread_time
        self._clock_cost = statistics.median(-clock() + clock() for _ in range(200))
        self.active = True
        self.cpu_start = time.process_time()
        events = monitoring.events
        monitoring.set_events(self._tool, events.PY_START | events.CALL | events.PY_UNWIND)

    def stop(self) -> None:
        self.active = False
        if self._tool is not None:
            sys.monitoring.set_events(self._tool, 0)
            for event in self._callbacks():  # local events stay on crossed code: let them call nothing
                sys.monitoring.register_callback(self._tool, event, None)
            sys.monitoring.free_tool_id(self._tool)
            self._tool = None
        environ_type = type(os.environ)
        for name, method in self._environ_patch.items():
            setattr(environ_type, name, method)

    def _uses(self) -> dict[str, dict[str, str]]:
        """unit -> other unit -> one of its modules naming it: what each unit's modules bound by
        importing another's (a module, or a function or class of it, in their globals). A
        compartment imports what its modules name, so this is what it must reach."""
        uses: dict[str, dict[str, str]] = {}
        for name, module in list(sys.modules.items()):
            unit = self.units.of_module(name)
            if unit is None or type(module) is not types.ModuleType:
                continue
            for value in list(vars(module).values()):
                other: Any
                if type(value) is types.ModuleType:
                    other = value.__name__
                elif isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
                    other = getattr(value, "__module__", None)
                else:
                    continue
                target = self.units.of_module(other) if isinstance(other, str) else None
                if target is not None and target != unit:
                    uses.setdefault(unit, {}).setdefault(target, name)
        return uses

    def record(self) -> dict[str, Any]:
        """Everything seen, as JSON-ready data (see flexos/trace/runs.py for its reader)."""
        units: dict[str, dict[str, Any]] = {}
        for name, module in list(sys.modules.items()):
            unit = self.units.of_module(name)
            if unit is None:
                continue
            entry = units.setdefault(unit, {"kind": self.units.kind(unit), "modules": [], "extensions": []})
            entry["modules"].append(name)
            if is_extension(module):
                entry["extensions"].append(name)
        for chain in (chain for table in self.observed.values() for *_, chain in table):
            for unit in chain:
                units.setdefault(unit, {"kind": self.units.kind(unit), "modules": [], "extensions": []})
        tables = {
            kind: [
                {"key": list(key[:-1]), "chain": list(key[-1]), "count": n, "site": site}
                for key, (n, site) in t.items()
            ]
            for kind, t in self.observed.items()
        }
        return {
            "units": units,
            "imports": {m: {"chain": list(c), "site": s} for m, (c, s) in self.imports.items()},
            "uses": self._uses(),
            "edges": [
                {
                    "caller": a,
                    "callee": b,
                    "calls": e[0],
                    "bytes_in": e[1],
                    "bytes_out": e[2],
                    "sites": [self._site_record(site, n) for site, n in e[3].items()],
                    "cpu_first": e[4] - self.cpu_start,
                    "cpu_last": e[5] - self.cpu_start,
                }
                for (a, b), e in self.edges.items()
            ],
            **tables,
            "recorder": {
                "seconds": self.spent(),
                "events": self.events,
                "crossings": self.crossings,
            },
        }


# -- what each audit event means -------------------------------------------------------------------
def _path(value: Any) -> str | None:
    if isinstance(value, int) or value is None:
        return None
    try:
        return os.path.abspath(os.fsdecode(value))
    except (TypeError, ValueError):
        return None


def _file(recorder: Recorder, access: str, path: str | None, via: str, frame: types.FrameType) -> None:
    if path is None or "/__pycache__" in path:  # bytecode caches: importlib ignores a refused write
        return
    if access == "write" and not os.path.exists(path):
        access = "create"
    recorder._note("files", (access, path, via), frame)


def _open(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    path, mode, flags = (args + (None, None, 0))[:3]
    writes = bool((flags or 0) & _WRITE_FLAGS) or (isinstance(mode, str) and any(c in mode for c in "wax+"))
    _file(recorder, "write" if writes else "read", _path(path), "open", frame)


def _list(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    path = args[0] if args else "."
    _file(recorder, "list", _path(path if path not in (None, "", b"") else "."), event, frame)


def _make(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    path = _path(args[0])
    if path is not None and not os.path.lexists(path):  # mkdir of what exists fails with EEXIST first
        recorder._note("files", ("create", path, event), frame)


def _remove(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    for value in args[:1] if event in ("os.remove", "os.rmdir") else args[:2]:
        path = _path(value)
        if path is not None:
            recorder._note("files", ("remove", path, event), frame)


def _sqlite(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    database = args[0] if args else None
    text = os.fsdecode(database) if isinstance(database, str | bytes | os.PathLike) else ""
    if text.startswith("file:"):
        text = text[5:].partition("?")[0]
    if text and text != ":memory:":
        recorder._note("files", ("database", os.path.abspath(text), event), frame)


def _socket(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    if event == "socket.__new__":
        family, address = _family(args[1] if len(args) > 1 else None), f"type {args[2] if len(args) > 2 else '?'}"
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        family, address = "name", str(args[0]) if args else "?"
    else:
        sock, address_value = (args + (None, None))[:2]
        family = _family(getattr(sock, "family", None))
        address = _address(address_value)
    recorder._note("sockets", (event, family, address), frame)


def _family(value: Any) -> str:
    import socket

    try:
        return socket.AddressFamily(value).name
    except (ValueError, TypeError):
        return str(value)


def _address(value: Any) -> str:
    if isinstance(value, tuple) and len(value) >= 2:
        return f"{value[0]}:{value[1]}"
    return os.fsdecode(value) if isinstance(value, str | bytes) else repr(value)


def _process(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
    elif event == "os.system":
        executable, argv = "/bin/sh", ["/bin/sh", "-c", args[0]]
    elif event in ("os.fork", "os.forkpty"):
        executable, argv = None, []
    elif event == "pty.spawn":
        executable, argv = None, args[0]
    elif event == "os.spawn":
        executable, argv = args[1], args[2]
    else:  # os.exec, os.posix_spawn
        executable, argv = args[0], args[1]
    words = [os.fsdecode(a) if isinstance(a, str | bytes | os.PathLike) else str(a) for a in _as_list(argv)]
    program = os.fsdecode(executable) if isinstance(executable, str | bytes | os.PathLike) else (words[:1] or [""])[0]
    recorder._note("processes", (event, program, " ".join(words[:4])), frame)


def _as_list(argv: Any) -> list:
    if isinstance(argv, str | bytes):
        return [argv]
    try:
        return list(argv)
    except TypeError:
        return []


def _import(recorder: Recorder, event: str, args: tuple, frame: types.FrameType) -> None:
    module = args[0] if args else None
    if isinstance(module, str) and module not in recorder.imports and module not in sys.modules:
        recorder.imports[module] = recorder.chain(frame)


_HANDLERS: dict[str, Callable[[Recorder, str, tuple, types.FrameType], None]] = {
    "open": _open,
    "os.listdir": _list,
    "os.scandir": _list,
    "os.mkdir": _make,
    "os.symlink": lambda r, e, a, f: _make(r, e, a[1:], f),
    "os.link": lambda r, e, a, f: _make(r, e, a[1:], f),
    "os.remove": _remove,
    "os.rmdir": _remove,
    "os.rename": _remove,
    "os.replace": _remove,
    "sqlite3.connect": _sqlite,
    "socket.__new__": _socket,
    "socket.connect": _socket,
    "socket.bind": _socket,
    "socket.sendto": _socket,
    "socket.sendmsg": _socket,
    "socket.getaddrinfo": _socket,
    "socket.gethostbyname": _socket,
    "socket.gethostbyaddr": _socket,
    "subprocess.Popen": _process,
    "os.system": _process,
    "os.posix_spawn": _process,
    "os.fork": _process,
    "os.forkpty": _process,
    "pty.spawn": _process,
    "import": _import,
}


# -- the run ----------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_GRACE_SECONDS = 10.0  # after a signal, how long the app may take to end before its record is written anyway


class _Run:
    """One run of the app under a recorder, and its record, written exactly once."""

    def __init__(self, out: Path, command: list[str]) -> None:
        self.out = out
        self.command = command
        self.recorder = Recorder()
        self.signalled: list[int] = []
        self._written = threading.Lock()
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()

    def interrupt(self, signum: int, frame: Any) -> None:
        """SIGTERM ends the app the way Ctrl-C does, so that a server's run ends and is recorded.
        A second signal at once (SIGTERM to a process group reaches ``flexos trace`` too, which
        passes it on) is the same one; an app still not done after a grace period (an asyncio
        server can wait forever for a connection interrupted half-way) is recorded as it is and ended."""
        if self.signalled:
            return
        self.signalled.append(signum)
        late = threading.Timer(_GRACE_SECONDS, self._end_now)
        late.daemon = True
        late.start()
        raise KeyboardInterrupt

    def _end_now(self) -> None:
        self.write(130)
        os._exit(130)

    def write(self, status: int) -> None:
        if not self._written.acquire(blocking=False):
            return
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):  # the record is written whatever comes now
                signal.signal(sig, signal.SIG_IGN)
        self.recorder.stop()
        wall, cpu = time.perf_counter() - self._wall, _cpu_seconds() - self._cpu
        data = self.recorder.record()
        data.update(
            version=RECORD_VERSION,
            command=self.command,
            cwd=os.getcwd(),
            status=status,
            wall_seconds=wall,
            cpu_seconds=cpu,
            always_readable=list(always_readable()),
            sys_path=[os.path.abspath(p) for p in sys.path],
            interrupted=bool(self.signalled),
            python=sys.version.split()[0],
        )
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        import json  # here: imported before the app, it would hide the app's own import of json

        self.out.write_text(json.dumps(data))


def run(out: Path, module: str | None, target: str | None, args: list[str]) -> int:
    """Run the app under a :class:`Recorder`; write the record to ``out``; return the exit status."""
    this = _Run(out, ["-m", module, *args] if module is not None else [target or "", *args])
    signal.signal(signal.SIGTERM, this.interrupt)
    signal.signal(signal.SIGINT, this.interrupt)
    os.register_at_fork(after_in_child=this.recorder.stop)  # a forked child is not recorded
    status = 0
    if module is not None:
        sys.argv = [module, *args]
        sys.path[0] = os.getcwd()
    else:
        sys.argv = [target or "", *args]
        sys.path[0] = str(Path(target or ".").resolve().parent)
    this.recorder.start()
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target or "", run_name="__main__")
        for thread in threading.enumerate():  # what the interpreter waits for at exit, it waits for here
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        this.write(status)
    return status


def main() -> None:
    argv = sys.argv[1:]
    if len(argv) < 2:
        raise SystemExit("usage: python -m flexos.trace OUT.json [-m MODULE | SCRIPT] [ARGS]...")
    out = Path(argv[0])
    if argv[1] == "-m":
        if len(argv) < 3:
            raise SystemExit("-m needs a module name")
        sys.exit(run(out, argv[2], None, argv[3:]))
    sys.exit(run(out, None, argv[1], argv[2:]))


if __name__ == "__main__":
    main()
