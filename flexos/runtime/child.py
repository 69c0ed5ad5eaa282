"""Where a compartment begins: ``python -I -m flexos.runtime.child FD FAULTS_FD CONSOLE_FD`` (a process),
the bootstrap of a subinterpreter (:func:`serve_in_subinterpreter`), and the app's own start under
``flexos run`` (:func:`exec_app`: a lean interpreter that loads the runtime, not the CLI's stack).

A process compartment receives its boot record over the control socket, applies the
compartment's hardening (flexos/hardening.py) before any component code can run, installs the
gates for modules that live elsewhere, answers "ready", then serves the channels its parent
opens until the parent goes away. Until the hardening is applied it imports only from the
interpreter's own paths (it starts isolated: no working directory, user site or ``PYTHON*``
variables); the app's ``sys.path`` is taken after. Neither imports the config/validation stack.
"""

from __future__ import annotations

import contextlib
import importlib
import marshal
import os
import select
import signal
import socket
import sys
import threading
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, NoReturn

from flexos import hardening
from flexos.drivers import driver_class
from flexos.drivers.console import install_synced_streams
from flexos.drivers.sibling import SiblingDesk
from flexos.errors import CompartmentCrashed, FlexosError, ProtocolError
from flexos.gates.link import Link
from flexos.image import Image
from flexos.runtime import Runtime, run_module, run_path, stats
from flexos.runtime.compartment import log_boundary
from flexos.runtime.stats import RunStats
from flexos.transports import Transport
from flexos.transports.bulk import BulkPort
from flexos.transports.shm import ShmTransport
from flexos.wire import control
from flexos.wire.control import BootRecord, Route

_INCOMPATIBLE = "does not support loading in subinterpreters"


def _die_with_parent() -> None:
    """Exit when the parent process does (PR_SET_PDEATHSIG would fire when the parent *thread*
    that spawned us exits, and compartments are spawned from whichever thread imports first)."""
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        os._exit(1)
    if os.getppid() != parent:  # it died before we could watch it
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="flexos-parent-watch").start()


def link_back(
    record: BootRecord,
    transport: Transport,
    explain: Callable[[Callable[[str], Any]], Callable[[str], Any]] | None = None,
) -> tuple[Runtime, Link]:
    """Compartment ``record.name``'s runtime, linked to the app over ``transport``, gates installed.

    ``explain`` wraps the importer that serves the app (to explain what this mechanism refuses).
    """
    runtime = Runtime(record.image, local=record.name, routes=record.routes)
    importer = runtime.importer_for(record.image.default)
    parent = runtime.link_parent(transport, explain(importer) if explain is not None else importer)
    runtime.start()
    return runtime, parent


def main() -> None:
    import faulthandler  # here: a subinterpreter imports this module, and faulthandler refuses to load there

    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    faults = int(sys.argv[2])  # the app reads it when we die: our stack goes into CompartmentCrashed
    os.set_inheritable(faults, False)
    faulthandler.enable(file=faults, all_threads=True)
    install_synced_streams(int(sys.argv[3]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the app, which sees it first
    try:
        boot, bulk_fds, _flags, _addr = socket.recv_fds(sock, 1 << 20, 3)
        record = BootRecord.from_wire(boot)
        image, name = record.image, record.name
        policy = image.compartments[name].hardening
        for sibling, way in record.routes.items():  # loaded now, from flexos's own place, not on first use
            if way == Route.DIRECT:
                driver_class(image.compartments[sibling].driver)
        # Namespaces, Landlock and seccomp bind only the calling thread: all go before any thread.
        filter_policy = hardening.seccomp_policy(policy)
        seccomp = hardening.seccomp_library() if filter_policy is not None else None
        if policy.get("network") == "none":
            hardening.isolate_network()
        if policy.get("filesystem") is not None:
            filesystem = policy["filesystem"]
            placed = [module for module, owner in image.libraries.items() if owner == name]
            elsewhere = [module for module, owner in image.libraries.items() if owner != name]
            hardening.restrict_filesystem(filesystem["read"], filesystem["write"], record.sys_path, placed, elsewhere)
        if filter_policy is not None:
            hardening.apply_seccomp(filter_policy, seccomp)
        sys.path[:] = record.sys_path  # the app's, writable places included: imports from it run hardened
        sys.argv[:] = record.argv
        _die_with_parent()
        hardening.apply_limits(policy.get("limits") or {})
        transport = ShmTransport(
            sock,
            sock.fileno(),
            0,
            death=lambda: CompartmentCrashed(image.default, None, "the app went away"),
            spin_us=record.spin_us,
        )
        runtime, parent = link_back(record, transport)
        if len(bulk_fds) == 3:  # the app's large buffers, and ours, beside the frames
            parent.carry_bulk(BulkPort(bulk_fds, views=image.buffer_sharing(name) == "view"))
        runtime.siblings = siblings = SiblingDesk(transport, record.spin_us, runtime.link_to)
        libraries = {
            module: rules["audit"]["deny"]
            for module, rules in image.library_hardening.items()
            if image.compartment_of(module) == name
        }
        settings = ("filesystem", "seccomp", "network", "limits.memory", "limits.processes", "audit")
        origins = {setting: image.origin(f"compartments.{name}.hardening.{setting}") for setting in settings}
        origins |= {f"libraries.{module}": image.origin(f"libraries.{module}.hardening.audit") for module in libraries}
        hardening.explain_denials(name, policy, origins, Link.dispatch.__code__, on_denial=log_boundary)
        deny = (policy.get("audit") or {}).get("deny", [])
        # Last: it trusts the code loaded until now, and only that.
        hardening.install_audit_policy(
            deny,
            name,
            libraries,
            record.sys_path,
            importers=[Runtime.serve_import],
            displaced=runtime.displaced.values(),
            origins=origins,
        )
    except Exception:
        sock.send(control.encode(control.boot_failed(traceback.format_exc())))
        os._exit(1)
    sock.send(control.encode(control.ready()))
    transport.accept_loop(parent, siblings.on_control)
    os._exit(0)


# -- a subinterp compartment ----------------------------------------------------------------------
_subinterpreter: dict[str, Any] = {}  # keeps this interpreter's runtime and link alive


def serve_in_subinterpreter(boot: bytes) -> int | str:
    """Boot this interpreter's side of a subinterp compartment: the endpoint the app calls into,
    or why it could not boot."""
    try:
        from flexos import _subinterp
        from flexos.transports.interp import InterpreterTransport

        record = BootRecord.from_wire(boot)
        if record.parent is None:
            raise ProtocolError("a subinterp compartment's boot record names no parent endpoint")
        default = record.image.default
        sys.argv[:] = record.argv
        transport = InterpreterTransport(
            record.parent, death=lambda: CompartmentCrashed(default, None, "the app went away")
        )
        runtime, parent = link_back(record, transport, partial(_explain_incompatible, name=record.name))
        _subinterpreter.update(runtime=runtime, link=parent)
        return _subinterp.register(parent.dispatch)
    except Exception as exc:
        return "".join(traceback.format_exception(exc))


def _explain_incompatible(serve_import: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """Import for the app, explaining extension modules that cannot live in a subinterpreter, and
    warning (in the app: warnings cross) when a module imported without one it fell back from."""
    refused = _watch_refused_extensions()

    def import_for_peer(module: str) -> Any:
        before = len(refused)
        try:
            served = serve_import(module)
        except ImportError as exc:
            if _INCOMPATIBLE not in str(exc):
                raise
            raise ImportError(
                f"{exc}: compartment {name!r} is a subinterpreter (driver 'subinterp'), and this extension "
                f"module supports only the main interpreter (single-phase init). Place {module!r} in a "
                f"compartment with driver 'process' instead.",
                name=module,
            ) from None
        if len(refused) > before:
            warnings.warn(fallback_note(module, refused[before:], name), RuntimeWarning, stacklevel=1)
        return served

    return import_for_peer


# -- the app, under flexos run ----------------------------------------------------------------------
def exec_app(
    image: Image, module: str | None, args: list[str], stats: bool = False, stats_json: str | None = None
) -> NoReturn:
    """Replace this process (the CLI, with its config stack loaded) by a lean interpreter that
    imports only the runtime and runs the app (``-m module args`` or ``script args``) under
    ``image``: the app's module table holds what a plain ``python`` would, plus the runtime.
    ``stats``: print the gate statistics to stderr at exit; ``stats_json``: write them there."""
    memfd = os.memfd_create("flexos-image", 0)  # inherited across exec: the image, validated, and what to report
    launch_record = {"image": image.to_dict(), "stats": stats, "stats_json": stats_json}
    os.write(memfd, marshal.dumps(launch_record))
    os.lseek(memfd, 0, os.SEEK_SET)
    flags = sys.orig_argv[1 : sys.orig_argv.index(sys.argv[0])] if sys.argv[0] in sys.orig_argv else []
    mode = ["-m", module] if module is not None else []
    launch = "from flexos.runtime.child import run_app; run_app()"
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: the runtime loads from the interpreter's own path, never from a file in the working directory
    os.execv(sys.executable, [sys.executable, *flags, "-P", "-c", launch, str(memfd), *mode, *args])


def run_app() -> NoReturn:
    """The lean interpreter's side of :func:`exec_app`: exit as ``python`` would for the app."""
    memfd, *rest = sys.argv[1:]
    with open(int(memfd), "rb") as data:
        launch_record = marshal.loads(data.read())
    image = Image.from_dict(launch_record["image"])
    wanted = launch_record["stats"] or launch_record["stats_json"] is not None
    collected: list[RunStats] = []  # the run's statistics, reported last: after the app's traceback, if any
    report = collected.append if wanted else None
    sys.path.insert(0, "")  # the app's own first entry, which run_path and run_module set as python does
    try:
        _run_app(rest, image, report)
    finally:
        if collected:
            _report(collected[0], launch_record["stats"], launch_record["stats_json"])


def _run_app(rest: list[str], image: Image, report: Callable[[RunStats], None] | None) -> NoReturn:
    try:
        if rest[0] == "-m":
            run_module(rest[1], rest[2:], image, report)
        else:
            run_path(rest[0], rest[1:], image, report)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except FlexosError as exc:
        if _from_the_app(exc.__traceback__) is exc.__traceback__:  # before the app ran: flexos's own
            print(f"flexos: {exc}", file=sys.stderr)
        else:  # raised to the app (a crashed compartment, a refused reach): as the app's own error
            traceback.print_exception(type(exc), exc, _from_the_app(exc.__traceback__))
        sys.exit(1)
    except BaseException as exc:
        # the app's own uncaught exception, as python would print it: from the app's first frame
        traceback.print_exception(type(exc), exc, _from_the_app(exc.__traceback__))
        sys.exit(1)
    sys.exit(0)


def _report(run: RunStats, table: bool, json_file: str | None) -> None:
    """What ``flexos run --stats`` / ``--stats-json FILE`` does with the run's statistics at exit:
    the table goes to the process's own stderr (fd 2, whatever the app did to ``sys.stderr``),
    never to stdout, which is the app's. It starts after an empty line: what the app wrote last
    need not end with a newline (a crash's last words often do not), and fd 2 cannot tell."""
    if json_file is not None:
        with open(json_file, "w") as out:
            out.write(stats.to_json(run) + "\n")
    if table:
        for stream in (sys.stdout, sys.stderr):  # the app's buffered output first, the table after it
            with contextlib.suppress(Exception):  # an app may have closed or replaced them
                stream.flush()
        os.write(2, ("\n" + stats.table(run) + "\n").encode())


def _from_the_app(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` from the app's own first frame (its ``__main__``) on, without flexos's frames (this
    launcher, runpy, a gate's proxy and link: the remote traceback is the exception's note)."""
    app = tb
    while app is not None and app.tb_frame.f_globals.get("__name__") != "__main__":
        app = app.tb_next
    if app is None:
        return tb
    kept = []
    while app is not None:
        if not str(app.tb_frame.f_globals.get("__name__", "")).startswith("flexos."):
            kept.append(app)
        app = app.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


def fallback_note(module: str, extensions: list[str], compartment: str | None = None) -> str:
    """What to tell the user about a module that imported without the C extensions it fell back from."""
    where = f"compartment {compartment!r}" if compartment else "a subinterp compartment"
    return (
        f"{module} was imported in {where} without {', '.join(sorted(set(extensions)))}: that C extension "
        f"supports only the main interpreter (single-phase init), so {module} runs its fallback (often pure "
        f"Python: slower, and it may behave differently). Place {module!r} in a compartment with driver "
        f"'process' to keep it."
    )


def _watch_refused_extensions() -> list[str]:
    """From now on, the name of every extension module this interpreter refuses to load (a list
    that grows); a library may catch the ImportError and fall back silently."""
    from importlib.machinery import ExtensionFileLoader

    refused: list[str] = []
    create_module = ExtensionFileLoader.create_module

    def create_module_watched(self: ExtensionFileLoader, spec: Any) -> Any:
        try:
            return create_module(self, spec)
        except ImportError as exc:
            if _INCOMPATIBLE in str(exc):
                refused.append(spec.name)
            raise

    ExtensionFileLoader.create_module = create_module_watched  # type: ignore[method-assign]
    return refused


def fallbacks_on_import(modules: list[str]) -> str:
    """In a throwaway subinterpreter (``flexos check``): import each module, and say which ones fall
    back from a C extension here, or cannot be imported at all (one note a line)."""
    refused = _watch_refused_extensions()
    notes = []
    for module in modules:
        before = len(refused)
        try:
            importlib.import_module(module)
        except Exception as exc:
            notes.append(f"{module} cannot be imported in a subinterpreter: {type(exc).__name__}: {exc}")
            continue
        if len(refused) > before:
            notes.append(fallback_note(module, refused[before:]))
    return "\n".join(notes)


if __name__ == "__main__":
    main()
