"""Interpreter-wide state between a compartment and the app: warnings, log records, sys.stdout/stderr.

A compartment with an interpreter of its own (process, subinterp, vm) has its own ``warnings``
filters, ``logging`` tree and ``sys.stdout``; without this module a library's warnings would
never reach the app's ``catch_warnings``, ``-W error`` or ``pytest.warns``, its log records
would miss the app's handlers, and its prints would ignore ``contextlib.redirect_stdout``. Right
after a compartment boots, the app calls :func:`install` in it with :class:`AppState`, through
which the compartment reaches the app's :func:`show_warning`, :func:`handle_record` and
:func:`write`, so that:

- every warning the compartment's own filters let through is handed to the app's
  ``warnings.warn_explicit``: the app's filters decide (an ``error`` filter raises at the
  library's ``warn()``, as it would unisolated);
- every log record reaches the app's logger of the same name, whose level and handlers decide;
- ``print`` and every write to ``sys.stdout``/``sys.stderr`` go to the app's current ones.

For a subinterp compartment, whose calls run on the app's own threads, Ctrl-C during a call
raises KeyboardInterrupt in the compartment's code (:func:`interrupt_on_ctrl_c`), as it would
unisolated. Codecs stay where they are registered (docs/gates.md#interpreter-wide-state says why). In an
interpreter the app shares (strict fcalls) there is nothing to forward: :func:`install` does
nothing there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

from flexos.errors import FlexosError

#: The record attributes that cross (by value); the message is sent formatted, the traceback as text.
_RECORD_FIELDS = (
    "name",
    "levelno",
    "levelname",
    "pathname",
    "filename",
    "module",
    "lineno",
    "funcName",
    "created",
    "msecs",
    "relativeCreated",
    "thread",
    "threadName",
    "process",
    "processName",
    "taskName",
    "stack_info",
)
_ACCEPTED = frozenset((*_RECORD_FIELDS, "msg", "exc_text"))
_PLAIN = (str, int, float, type(None))
#: sys.monitoring tool ids no standard tool claims (0-2 and 5 are the debugger's, coverage's,
#: the profiler's and the optimizer's).
_FREE_TOOL_IDS = (3, 4)
#: Seconds after Ctrl-C in which a compartment's next line raises KeyboardInterrupt.
_INTERRUPT_WINDOW_S = 0.2
#: At most this many modules' warnings are remembered (a compartment could name endlessly many).
_MAX_REGISTRIES = 4096
# The app's "once per location" memory of the warnings compartments forward, per module.
_registries: dict[str, dict] = {}


def interpreter() -> tuple[int, int]:
    """Which interpreter this is: two compartments with the same one share all of this state."""
    return os.getpid(), id(sys)


# -- in the app: what a compartment calls ----------------------------------------------------------
def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, module: str) -> None:
    """Warn in the app, as the compartment's code did: the app's filters decide what happens."""
    registry = _registries.get(module)
    if registry is None and len(_registries) < _MAX_REGISTRIES:
        registry = _registries[module] = {}
    warnings.warn_explicit(message, category, filename, lineno, module, registry)


def handle_record(fields: dict[str, Any]) -> None:
    """Hand a compartment's log record to the app's logger of its name (its level, its handlers).

    Only the fields a record is made of are taken, and only plain values: a handler never meets
    an attribute or an object the compartment chose."""
    record = logging.makeLogRecord(
        {name: value for name, value in fields.items() if name in _ACCEPTED and type(value) in _PLAIN}
    )
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)


def write(stream: str, text: str | None) -> None:
    """Write ``text`` to the app's current ``sys.stdout`` or ``sys.stderr`` (None: flush it)."""
    target = sys.stdout if stream == "stdout" else sys.stderr
    if target is None:
        return
    if text is None:
        target.flush()
    else:
        target.write(text)


_SERVED: dict[str, Callable[..., None]] = {"warning": show_warning, "record": handle_record, "write": write}


class AppState:
    """What a compartment calls to reach the functions above: ``AppState(kind, *args)`` runs
    ``_SERVED[kind](*args)`` in the app and makes nothing. A class, because a compartment holds a
    class it is given outside its bound on the app's objects, and holds this one for its life."""

    def __new__(cls, kind: str, *args: Any) -> None:  # type: ignore[misc]
        _SERVED[kind](*args)


# -- in the compartment -------------------------------------------------------------------------------
def install(app: tuple[int, int], app_state: Callable[..., None]) -> bool:
    """Forward this interpreter's warnings, log records and writes to the app (``app``: its
    :func:`interpreter`; ``app_state``: its :class:`AppState`); False if it is this one."""
    if app == interpreter():
        return False

    def forward_warning(
        message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        app_state("warning", message, category, filename, lineno, _module_of(filename))

    warnings.resetwarnings()
    warnings.simplefilter("always")  # the app's filters decide; the library's own still go first
    warnings.showwarning = forward_warning
    root = logging.getLogger()
    root.addHandler(_AppHandler(partial(app_state, "record")))
    root.setLevel(logging.NOTSET)  # the app's loggers decide what is enabled
    app_write = partial(app_state, "write")
    sys.stdout = _AppStream("stdout", app_write, sys.stdout)
    sys.stderr = _AppStream("stderr", app_write, sys.stderr)
    return True


def interrupt(thread: int) -> bool:
    """Raise KeyboardInterrupt in OS thread ``thread`` at the next line of Python it runs in this
    interpreter within :data:`_INTERRUPT_WINDOW_S`, as Ctrl-C does in the app; False if debuggers
    and profilers hold every monitoring tool id.

    For a subinterp compartment, whose calls run on the app's own thread: the app's signal handler
    runs only once the thread is back in the app. A C call or a ``sleep`` is not cut short (the
    app's handler raises when it returns). The window keeps an interrupt the app's own handler has
    already dealt with from hitting a later call."""
    monitoring = sys.monitoring
    tool = next((tool for tool in _FREE_TOOL_IDS if monitoring.get_tool(tool) is None), None)
    if tool is None:
        return False
    until = time.monotonic() + _INTERRUPT_WINDOW_S
    armed = [True]

    def on_line(code: Any, line: int) -> Any:
        late = time.monotonic() >= until
        if not armed or (threading.get_ident() != thread and not late):
            return None
        armed.clear()
        monitoring.set_events(tool, 0)
        monitoring.register_callback(tool, monitoring.events.LINE, None)
        monitoring.free_tool_id(tool)
        if not late:
            raise KeyboardInterrupt
        return None

    monitoring.use_tool_id(tool, "flexos-interrupt")
    monitoring.register_callback(tool, monitoring.events.LINE, on_line)
    monitoring.set_events(tool, monitoring.events.LINE)
    return True


# -- in the app: Ctrl-C reaches the compartments that run on the app's own threads --------------------
_interrupts: dict[str, Callable[[int], bool]] = {}
_watching = False


def interrupt_on_ctrl_c(compartment: str, compartment_interrupt: Callable[[int], bool]) -> None:
    """On SIGINT, have ``compartment`` (a subinterp: it runs on the app's threads) interrupt what the
    app's main thread runs there. Watched through ``signal.set_wakeup_fd`` (chained to one the app
    set before): the signal handler itself runs only once the main thread is back in the app."""
    global _watching
    _interrupts[compartment] = compartment_interrupt
    if _watching or threading.current_thread() is not threading.main_thread():
        return  # set_wakeup_fd is the main thread's; a later boot from it starts the watch
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # the app handles Ctrl-C itself
    read, write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    chained = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    os.set_blocking(read, True)
    _watching = True
    main = threading.main_thread().ident or 0
    threading.Thread(target=_watch_ctrl_c, args=(read, chained, main), daemon=True, name="flexos-ctrl-c").start()


def _watch_ctrl_c(read: int, chained: int, main: int) -> None:
    while True:
        signals = os.read(read, 512)
        if chained >= 0:
            with contextlib.suppress(OSError):
                os.write(chained, signals)
        if signal.SIGINT in signals:
            for compartment_interrupt in list(_interrupts.values()):
                with contextlib.suppress(Exception):  # a compartment that ended, or refuses
                    compartment_interrupt(main)


def _module_of(filename: str) -> str:
    """The module the warning is attributed to (the app's filters match it), from the warning
    frame on this stack; else the file's name as ``warnings`` itself would guess it."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename == filename:
            return str(frame.f_globals.get("__name__", ""))
        frame = frame.f_back  # type: ignore[assignment]
    return os.path.splitext(filename)[0]


class _AppHandler(logging.Handler):
    """Sends each record to the app (its message formatted here: its arguments may not cross)."""

    def __init__(self, app_handle_record: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._app_handle_record = app_handle_record
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {name: getattr(record, name, None) for name in _RECORD_FIELDS}
            fields["msg"] = record.getMessage()
            if record.exc_info:
                fields["exc_text"] = self._formatter.formatException(record.exc_info)
            self._app_handle_record(fields)
        except Exception:
            self.handleError(record)


class _AppStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a compartment: each write goes to the app's current one,
    or to the compartment's own stream once the app cannot be reached."""

    def __init__(self, name: str, app_write: Callable[[str, str | None], None], own: Any) -> None:
        super().__init__()
        self._name = name
        self._app_write = app_write
        self._own = own

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._own, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._own, "errors", "strict")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._own.fileno()

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self) -> Any:  # bytes written here go out through the compartment's own stream
        return self._own.buffer

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        try:
            self._app_write(self._name, text)
        except FlexosError:  # the app is gone or unreachable: our own stream still works
            return self._own.write(text)
        return len(text)

    def flush(self) -> None:
        try:
            self._app_write(self._name, None)
        except FlexosError:
            self._own.flush()
