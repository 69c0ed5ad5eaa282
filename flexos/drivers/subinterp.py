"""``subinterp``: the compartment is a CPython subinterpreter of the app's own process (PEP 684).

Our counterpart of FlexOS's Intel MPK backend: one address space, separate protection domains
for Python objects. The subinterpreter has its own GIL, its own module state and its own
allocator, and shares nothing with the app but what crosses its gates. A gate switches the
calling thread into the compartment and back (``flexos._subinterp``), as an MPK gate switches
the protection key: no second thread, no queue, no polling. Two threads calling two subinterp
compartments run in parallel.

Against the compartment's Python code, ``flexos._subinterp`` refuses everything but its own gate:
it cannot run code in, call, end or borrow from another interpreter, nor lend the app memory it
could change afterwards. It is not a security boundary against native code: ctypes, a C extension
or ``/proc/self/mem`` in the compartment reach the whole process, and a crash in it ends the app
(docs/security.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from flexos.drivers.base import Driver
from flexos.errors import CompartmentCrashed, CompartmentStartError
from flexos.gates.link import Link
from flexos.transports.interp import InterpreterTransport

# Runs inside the new interpreter: SYS_PATH (a list literal: where to find flexos) and BOOT (the
# boot record's wire form, a bytes literal) are defined before it.
_BOOTSTRAP = """
import sys
sys.path[:] = SYS_PATH
from flexos.runtime.child import serve_in_subinterpreter
result = serve_in_subinterpreter(BOOT)
"""
# Runs in a throwaway interpreter for ``flexos check``: SYS_PATH and MODULES (a list literal) first.
_PREDICT_IN_A_SUBINTERPRETER = """
import sys
from flexos import _subinterp
interp = _subinterp.create()
try:
    print(_subinterp.run(interp, sys.argv[1]) or "")
finally:
    _subinterp.destroy(interp)
"""
_PREDICT = """
import sys
sys.path[:] = SYS_PATH
from flexos.runtime.child import fallbacks_on_import
result = fallbacks_on_import(MODULES)
"""


class SubinterpDriver(Driver):
    name = "subinterp"
    in_app_process = True
    large_buffers = (
        "lend the app's own memory, unsealed (the app may still write a lent bytearray), and copy what comes back"
    )
    strength = 2
    letter = "s"
    fork_aborts_child = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._interp: int | None = None
        self._gate: int | None = None  # our dispatcher, which the compartment calls back into
        self._link: Link | None = None

    @classmethod
    def refuses(cls, extensions: dict[str, str]) -> dict[str, str]:
        from flexos.probe import subinterpreter_refuses

        return subinterpreter_refuses(extensions)

    @classmethod
    def unavailable(cls, options: Any = None) -> str | None:
        if sys.version_info < (3, 13):
            return (
                f"subinterp needs CPython 3.13+ (a GIL per interpreter and isolated extension modules); this is "
                f"{sys.version_info[0]}.{sys.version_info[1]}. Use driver 'process' instead."
            )
        try:
            from flexos import _subinterp
        except ImportError as exc:
            return f"flexos's subinterpreter gate is not built ({exc}); reinstall flexos (scripts/setup)"
        if not _subinterp.AVAILABLE:
            return "flexos's subinterpreter gate was built for a Python without per-interpreter GILs"
        return None

    @classmethod
    def describe(cls, options: Any) -> str:
        """The caveat a reviewer must see next to every subinterp compartment."""
        return (
            "not a boundary against native code: ctypes, a C extension or /proc/self/mem in it "
            "reads and writes the whole app process"
        )

    @classmethod
    def predict(cls, modules: list[str]) -> list[str]:
        """Import ``modules`` in a subinterpreter of a throwaway process (as the compartment will,
        but never in this one) and say which fall back from a C extension there, or cannot be
        imported."""
        if not modules or cls.unavailable() is not None:
            return []
        code = f"SYS_PATH = {[os.getcwd(), *sys.path]!r}\nMODULES = {modules!r}\n{_PREDICT}"
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _PREDICT_IN_A_SUBINTERPRETER, code],
                capture_output=True,
                text=True,
                timeout=120,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return [f"importing {', '.join(modules)} in a subinterpreter could not be tried: {exc}"]
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return [f"importing {', '.join(modules)} in a subinterpreter failed: {last}"]
        return [line for line in done.stdout.splitlines() if line]

    def start(self, mirrors: dict) -> Link:
        from flexos import _subinterp

        name = self.spec.name
        link = self.make_link(mirrors)
        try:
            self._interp = _subinterp.create()
            self._gate = _subinterp.register(link.dispatch, self._interp)  # ours, for that one to call
            boot = self.boot_record(parent=self._gate)
            bootstrap = f"SYS_PATH = {boot.sys_path!r}\nBOOT = {boot.to_wire()!r}\n{_BOOTSTRAP}"
            answer = _subinterp.run(self._interp, bootstrap)
            if isinstance(answer, int):
                _subinterp.adopt(answer, self._interp, self.spec.max_reply)
        except (RuntimeError, LookupError) as exc:
            answer = str(exc)
        if not isinstance(answer, int):
            self.stop()
            raise CompartmentStartError(f"compartment {name!r} failed to boot in a subinterpreter: {answer}")
        transport = InterpreterTransport(answer, death=lambda: CompartmentCrashed(name, None, "it was stopped"))
        link.codec.lend_buffers(transport.lend, InterpreterTransport.LEND_THRESHOLD)
        link.attach(transport)
        self._link = link
        return link

    def forget(self) -> bool:
        # In a forked child CPython has already deleted every subinterpreter: nothing to end.
        self._link = self._gate = self._interp = None
        return True

    def stop(self) -> None:
        from flexos import _subinterp

        if self._link is not None:
            self._link.closed = True
            self._link = None
        if self._gate is not None:
            _subinterp.unregister(self._gate)
            self._gate = None
        if self._interp is not None:
            interp, self._interp = self._interp, None
            _subinterp.destroy(interp)
