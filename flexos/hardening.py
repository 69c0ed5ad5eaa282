"""Per-compartment hardening: what FlexOS does with UBSan/KASan/stack protector per library, done
with the Linux and Python mechanisms a Python compartment can use.

Declared under ``hardening:`` of a ``process`` compartment in flexos.yaml and applied inside the
compartment's process before any component code runs (flexos/runtime/child.py calls these in
order). A requested protection that cannot be applied stops the compartment from starting: it
never runs unhardened.

- ``env: clean``       the process starts with an empty environment (no inherited secrets),
                       but the variables ``env: {keep: [...]}`` names;
- ``network: none``    a new user + network namespace: no interface but a loopback that is down;
- ``filesystem``       Landlock: only the listed paths (plus, read-only, what Python itself needs
                       and the packages of the modules placed in the compartment, not the app's
                       directory) can be read or written; with Landlock ABI >= 6 the compartment also cannot
                       signal processes outside it (the app);
- ``seccomp``          a seccomp filter in the kernel: named profiles (``compute-only``) and
                       deny/allow lists of system calls, answered with EPERM (calls through
                       any ABI but the native one: ENOSYS);
- ``limits``           rlimits: ``memory`` (RLIMIT_DATA), ``cpu_seconds`` (RLIMIT_CPU),
                       ``open_files`` (RLIMIT_NOFILE); ``processes: 0`` through seccomp;
- ``audit: {deny}``    a Python audit hook refusing the listed events (PEP 578) raised on a
                       component's behalf (told by code identity; a thread acts for whoever
                       started it); a library's own ``hardening.audit`` applies while that
                       library has code on the stack or started the thread.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.machinery
import os
import resource
import socket
import sys
import threading
import types
import weakref
from _thread import get_ident
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flexos import _linux
from flexos.errors import HardeningError

# Friendly names for groups of audit events.
AUDIT_ALIASES: dict[str, tuple[str, ...]] = {
    "subprocess": (
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
    ),
}
# Packages whose frames are flexos's own machinery rather than component code.
MACHINERY = frozenset({"flexos", "msgpack"})
CLEAN_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def environment(hardening: dict[str, Any]) -> dict[str, str] | None:
    """The environment to start the compartment process with (None: inherit the app's): clean is
    :data:`CLEAN_ENVIRONMENT`, the variables ``env: {keep: [...]}`` names, and flexos's own
    ``FLEXOS_VERBOSE`` (the user asked to see the boundaries, this one's included)."""
    env = hardening.get("env")
    if env in (None, "inherit"):
        return None
    keep = ["FLEXOS_VERBOSE", *(env.get("keep", []) if isinstance(env, dict) else [])]
    return {**CLEAN_ENVIRONMENT, **{name: os.environ[name] for name in keep if name in os.environ}}


def isolate_network() -> None:
    """Enter a new user and network namespace. Must run while the process has one thread."""
    uid, gid = os.getuid(), os.getgid()
    try:
        os.unshare(_linux.CLONE_NEWUSER | _linux.CLONE_NEWNET)
    except OSError as exc:
        raise HardeningError(f"network: none needs user and network namespaces: unshare failed: {exc}") from None
    # Keep our own uid/gid inside, so files keep the ownership they have outside.
    with open("/proc/self/setgroups", "w") as setgroups:
        setgroups.write("deny")
    with open("/proc/self/uid_map", "w") as uid_map:
        uid_map.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as gid_map:
        gid_map.write(f"{gid} {gid} 1")


def apply_limits(limits: dict[str, Any]) -> None:
    table = (
        ("memory", resource.RLIMIT_DATA, 0),
        ("cpu_seconds", resource.RLIMIT_CPU, 1),  # hard = soft + 1: SIGXCPU first, then SIGKILL
        ("open_files", resource.RLIMIT_NOFILE, 0),
    )  # ``processes`` is enforced by seccomp_policy()
    for key, which, slack in table:
        value = limits.get(key)
        if value is None:
            continue
        try:
            resource.setrlimit(which, (value, value + slack))
        except (OSError, ValueError) as exc:
            raise HardeningError(f"limits.{key}: setrlimit failed: {exc}") from None


def expand_events(deny: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact audit event names, and prefixes (an entry also denies ``entry.anything``)."""
    exact: set[str] = set()
    for entry in deny:
        exact.update(AUDIT_ALIASES.get(entry, (entry,)))
    return frozenset(exact), tuple(f"{event}." for event in exact)


def acting_frames(frame: Any, components: frozenset[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """Component code on the stack from ``frame`` out, innermost first, as (module, frame): frames
    that are not the standard library (nor ``__main__``), and those whose top-level package is in
    ``components``. Ends at flexos's own machinery: what it does (opening a channel or reaching a
    sibling for a gate the component crossed) is not the component's, nor what its callers did."""
    stdlib = sys.stdlib_module_names
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        top = module.partition(".")[0]
        if top in MACHINERY:
            return
        if top in components or (top not in stdlib and top not in ("__main__", "")):
            yield module, frame
        frame = frame.f_back


# -- audit hooks (PEP 578) --------------------------------------------------------------------------
# The events flexos's own machinery raises in a compartment while it serves gates: opening a channel
# or reaching a sibling (sockets and the descriptors passed over them, memfds, mmaps), its threads,
# id() of exported objects. Only these, and only when flexos's own code raises them, are not the
# component's: flexos never spawns a process or loads native code in a compartment.
_MACHINERY_EVENTS = frozenset(
    {
        "socket.__new__",
        "socket.sendmsg",
        "array.__new__",
        "mmap.__new__",
        "os.truncate",
        "fcntl.fcntl",
        "_thread.start_new_thread",
        "_thread.start_joinable_thread",
        "builtins.id",
        "object.__setattr__",
    }
)
_THREAD_STARTS = frozenset({"_thread.start_new_thread", "_thread.start_joinable_thread"})
# The ways from plain Python to the hook's own state (its frames, its objects): refused whenever an
# audit policy is installed, whoever asks.
_HOOK_GUARDS = frozenset(
    {
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
        "sys._current_frames",
        "sys.settrace",
        "sys.setprofile",
        "sys.monitoring.register_callback",
    }
)
# Whose code a frame runs: the interpreter's (loaded before any component: stdlib, flexos's
# dependencies), flexos's machinery, flexos importing a module the app asked for, or a component's.
_INTERPRETER, _MACHINERY_CODE, _IMPORTER, _COMPONENT = range(4)
_CodeTable = dict[int, tuple[types.CodeType, dict[str, Any], int]]


def _loaded_code(importers: Iterable[Any], displaced: Iterable[types.ModuleType] = ()) -> _CodeTable:
    """Every code object of the modules loaded so far, by id: (code, its globals, whose).
    ``displaced``: loaded modules the runtime took out of ``sys.modules`` (placed elsewhere).

    Called before any component code runs, so what it finds is the interpreter's, flexos's and its
    dependencies' code, and nothing a component made: a frame counts as one of these only if it
    runs the very code object with the very globals found here (a copy compiled under flexos's name
    or file does not). ``importers``: flexos's functions that import modules the app asks for.
    """
    table: _CodeTable = {}
    seen: set[int] = set()

    def add_code(code: types.CodeType, namespace: dict[str, Any], whose: int) -> None:
        table[id(code)] = (code, namespace, whose)
        for const in code.co_consts:
            if type(const) is types.CodeType:
                add_code(const, namespace, whose)

    def visit(value: Any, depth: int = 0) -> None:
        if id(value) in seen or depth > 8:
            return
        seen.add(id(value))
        try:
            while type(value) is not type and getattr(value, "__wrapped__", None) is not None:
                value = value.__wrapped__  # functools.cache, functools.wraps
        except Exception:  # an object of the interpreter's that answers attribute reads oddly
            return
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if type(value) is types.FunctionType:
            name = value.__globals__.get("__name__") or ""
            own = name == "flexos" or name.startswith("flexos.")
            add_code(value.__code__, value.__globals__, _MACHINERY_CODE if own else _INTERPRETER)
        elif isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                if accessor is not None:
                    visit(accessor, depth + 1)
        elif isinstance(value, type):
            for member in list(vars(value).values()):
                visit(member, depth + 1)

    for module in [*sys.modules.values(), *displaced]:
        if type(module) is types.ModuleType:  # not flexos's gates (ModuleProxy)
            for value in list(vars(module).values()):
                visit(value)
    for importer in importers:
        table[id(importer.__code__)] = (importer.__code__, importer.__globals__, _IMPORTER)
    return table


def locate(module: str, code_paths: list[str]) -> importlib.machinery.ModuleSpec | None:
    """Where ``module`` would be imported from on ``code_paths`` (None: nowhere), found as the
    import system finds it but without running any code of it or of its parent packages. The
    top level is also asked of the finders an install put first (editable installs), not flexos's."""
    parts = module.split(".")
    spec = None
    for finder in sys.meta_path:
        if type(finder).__module__.partition(".")[0] == "flexos":
            continue
        if finder is importlib.machinery.PathFinder:
            spec = finder.find_spec(parts[0], code_paths)
        elif callable(getattr(finder, "find_spec", None)):
            try:
                spec = finder.find_spec(parts[0], None)
            except Exception:  # a third-party finder that fails on a name it does not know
                spec = None
        if spec is not None:
            break
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: depth + 1]), list(spec.submodule_search_locations)
        )
    return spec


def extension_modules(module: str, code_paths: list[str]) -> dict[str, str]:
    """The C extension modules ``module`` is or holds (name -> file), found without importing."""
    spec = locate(module, code_paths)
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    if spec is None or not spec.has_location:
        return {}
    if not spec.submodule_search_locations:
        return {module: spec.origin} if spec.origin and spec.origin.endswith(suffixes) else {}
    found = {}
    for location in spec.submodule_search_locations:
        for where, _, files in os.walk(location):
            package = os.path.relpath(where, location).replace(os.sep, ".")
            for name in files:
                suffix = next((s for s in suffixes if name.endswith(s)), None)
                if suffix is not None:
                    parts = [module, *([] if package == "." else [package]), name[: -len(suffix)]]
                    found[".".join(parts)] = os.path.join(where, name)
    return found


def _library_files(libraries: Iterable[str], code_paths: list[str]) -> tuple[tuple[str, str], ...]:
    """(file, or directory ending in /, library) for each library with a policy, longest first:
    found on ``code_paths`` as the import system would find it, without running any of its code."""
    found = []
    for library in libraries:
        spec = locate(library, code_paths)
        if spec is not None and spec.submodule_search_locations:
            found += [(os.path.join(location, ""), library) for location in spec.submodule_search_locations]
        elif spec is not None and spec.origin:
            found.append((spec.origin, library))
    return tuple(sorted(found, key=lambda entry: -len(entry[0])))


def install_audit_policy(
    deny: list[str],
    compartment: str,
    libraries: dict[str, list[str]] | None = None,
    code_paths: Iterable[str] = (),
    importers: Iterable[Any] = (),
    displaced: Iterable[types.ModuleType] = (),
    origins: dict[str, str] | None = None,
) -> None:
    """Refuse denied audit events raised on behalf of component code, for the life of the process.

    Whose an event is, is read off the stack by code identity (:func:`_loaded_code`): the first code
    on it that is not the interpreter's decides. flexos's machinery raising one of
    ``_MACHINERY_EVENTS``, or flexos importing a module the app asked for (``importers``), is
    exempt; everything else is the component's. A stack of only the interpreter's code is a thread
    acting for whoever started it. For the component's events the compartment's ``deny`` applies,
    and the ``deny`` of each library in ``libraries`` (found on ``code_paths``) that has code on the
    stack or started the thread, or of every library when no component code is in sight (a thread
    running a C function, a C callable that flexos's dispatcher was handed). ``origins``: where each
    policy is written (``audit``, ``libraries.NAME``: ``FILE:LINE``), for the messages.

    The hook calls nothing a component could have defined: identity checks, exact-str comparisons
    and C attribute reads only, so no component code runs while it decides.
    """
    exact, prefixes = expand_events(deny)
    per_library = {name: expand_events(events) for name, events in (libraries or {}).items()}
    origins = origins or {}
    written = f"hardening.audit, {origins.get('audit', 'flexos.yaml')}"
    written_for = {
        name: f"libraries.{name}.hardening.audit, {origins.get(f'libraries.{name}', 'flexos.yaml')}"
        for name in per_library
    }
    watched = frozenset(exact.union(*(events for events, _ in per_library.values())))
    if not watched:
        return
    watched_prefixes = tuple(f"{event}." for event in watched)
    every_library = frozenset(per_library)
    code = _loaded_code(importers, displaced)
    files = _library_files(per_library, list(code_paths))
    active_threads = threading._active  # type: ignore[attr-defined]  # ident -> Thread: threading's own table
    started: dict[int, tuple[weakref.ref, int, frozenset[str]]] = {}  # id(Thread) -> whose it is
    busy: set[int] = set()  # threads inside the hook: what it raises itself is not judged again

    def library_of(filename: Any) -> str | None:
        if type(filename) is str:
            for prefix, library in files:
                if filename == prefix or (prefix[-1] == os.sep and filename.startswith(prefix)):
                    return library
        return None

    def judge(frame: Any) -> tuple[int, frozenset[str]]:
        """(whose the first code that is not the interpreter's is, the libraries the event is for)."""
        first = _INTERPRETER
        component = False
        acting: set[str] = set()
        while frame is not None:
            entry = code.get(id(frame.f_code))
            if entry is not None and entry[0] is frame.f_code and entry[1] is frame.f_globals:
                if first == _INTERPRETER:
                    first = entry[2]
            else:
                if first == _INTERPRETER:
                    first = _COMPONENT
                component = True
                library = library_of(frame.f_code.co_filename)
                if library is not None:
                    acting.add(library)
            frame = frame.f_back
        thread = active_threads.get(get_ident())
        starter = started.get(id(thread)) if thread is not None else None
        if starter is not None and starter[0]() is thread:
            _ref, starter_first, starter_libraries = starter
            if first == _INTERPRETER:
                first = starter_first
            if starter_first == _COMPONENT:
                component = True
                acting |= starter_libraries
        if first == _INTERPRETER:  # no Python code but the interpreter's, and no known starter
            first = _COMPONENT
        return first, frozenset(acting) if component else every_library

    def remember_starter(thread: Any, first: int, acting: frozenset[str]) -> None:
        """A thread acts for the code that started it (as long as its Thread object lives)."""
        if issubclass(type(thread), threading.Thread):
            key = id(thread)
            try:
                started[key] = (weakref.ref(thread, lambda _ref: started.pop(key, None)), first, acting)
            except TypeError:  # a Thread subclass without __weakref__: its own frames speak for it
                pass

    def hook(event: str, args: tuple[Any, ...]) -> None:
        guarded = event in _HOOK_GUARDS
        if not (guarded or event in _THREAD_STARTS or event in watched or event.startswith(watched_prefixes)):
            return
        me = get_ident()
        if me in busy:
            return
        busy.add(me)
        try:
            if guarded:
                raise PermissionError(
                    f"{event!r} is denied in compartment {compartment!r}: it reaches the audit hook's own state "
                    f"({written})"
                )
            try:
                caller = sys._getframe(1)
            except ValueError:  # a thread running a C function: not one Python frame
                caller = None
            first, acting = judge(caller)
            if event in _THREAD_STARTS and type(args[0]) is types.MethodType:  # threading's _bootstrap
                remember_starter(args[0].__self__, first, acting)
            if first == _IMPORTER or (first == _MACHINERY_CODE and event in _MACHINERY_EVENTS):
                return
            if event in exact or event.startswith(prefixes):
                raise PermissionError(f"{event!r} is denied in compartment {compartment!r} ({written})")
            for library in sorted(acting):
                library_exact, library_prefixes = per_library[library]
                if event in library_exact or event.startswith(library_prefixes):
                    raise PermissionError(f"{event!r} is denied for library {library!r} ({written_for[library]})")
        finally:
            busy.discard(me)

    sys.addaudithook(hook)


# -- Landlock (linux/landlock.h; system call numbers in flexos/_linux.py) ---------------------------
_SCOPE_SIGNAL = 1 << 1
# Filesystem rights by the ABI that introduced them.
_FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_TRUNCATE, _IOCTL_DEV = 1 << 14, 1 << 15
_FILE_RIGHTS = _EXECUTE | _WRITE_FILE | _READ_FILE | _TRUNCATE | _IOCTL_DEV
_READ = _EXECUTE | _READ_FILE | _READ_DIR
_FLEXOS = os.path.dirname(os.path.abspath(__file__))  # the flexos package, which keeps running
# What the interpreter itself reads after the restriction: its libraries and a few devices.
_SYSTEM_READ = (
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/dev/null",
    "/dev/urandom",
    "/dev/zero",
)


def interpreter_paths() -> tuple[str, ...]:
    """Where this interpreter's own code lives: its prefixes, standard library and site-packages
    (with what their .pth files add), and flexos. Not the app's directory: ``sys.path[0]`` is the
    script's unless the interpreter started isolated (a compartment's: ``-I``)."""
    own_path = sys.path if sys.flags.isolated else sys.path[1:]
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *own_path, os.path.dirname(os.__file__), _FLEXOS}
    return tuple(sorted(os.path.abspath(path) for path in paths))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(os.path.join(root, "")) for root in roots)


def app_code(code: Iterable[str]) -> list[str]:
    """The entries of the app's ``sys.path`` that are not the interpreter's: its own directory
    (where .env, config files and databases live too) and whatever else it put there."""
    interpreter = interpreter_paths()
    return [path for path in dict.fromkeys(os.path.abspath(entry) for entry in code) if not _under(path, interpreter)]


def placed_code(code: Iterable[str], placed: Iterable[str], elsewhere: Iterable[str] = ()) -> list[str]:
    """Where the modules ``placed`` in a compartment and their dependencies live in the app's own
    code: the whole top-level package of each, or the single module file. Dependencies are read
    off the import statements of their source (nothing runs), transitively within the app's code;
    modules placed ``elsewhere`` are gates there, and need no file."""
    own = app_code(code)
    skip = set(elsewhere)
    found: list[str] = []
    pending = list(dict.fromkeys(name.partition(".")[0] for name in placed))
    seen = set(pending)
    while pending:
        spec = locate(pending.pop(), own)
        if spec is None or not spec.has_location:
            continue
        if spec.submodule_search_locations:
            roots = [os.path.abspath(location) for location in spec.submodule_search_locations]
        elif spec.origin:
            roots = [os.path.abspath(spec.origin)]
        else:
            continue
        roots = [root for root in roots if _under(root, own)]
        found += roots
        for module in _imported_by(roots):
            if module not in seen and module not in skip:
                seen.add(module)
                pending.append(module)
    return list(dict.fromkeys(found))


def _imported_by(roots: Iterable[str]) -> set[str]:
    """The top-level names the Python sources at ``roots`` (files, or package directories) import
    absolutely, as their import statements say."""
    import ast

    names: set[str] = set()
    for root in roots:
        files = (
            [root]
            if os.path.isfile(root)
            else [
                os.path.join(where, name)
                for where, _, listed in os.walk(root)
                for name in listed
                if name.endswith(".py")
            ]
        )
        for path in files:
            try:
                with open(path, "rb") as source:
                    tree = ast.parse(source.read(), path)
            except (OSError, SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name.partition(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.partition(".")[0])
    return names


def always_readable(
    code: Iterable[str] = (), placed: Iterable[str] = (), elsewhere: Iterable[str] = ()
) -> tuple[str, ...]:
    """What a ``filesystem``-restricted compartment may read besides its allowlist: the system's
    libraries and devices, the interpreter's own code (:func:`interpreter_paths`, flexos included:
    an editable install is reached through a finder, and a compartment imports a driver module
    when it first reaches a sibling), and of the app's own code (``code``: its ``sys.path``) only
    where the modules ``placed`` in the compartment live (:func:`placed_code`). The app's
    directory itself is neither readable nor listable (``elsewhere``: the modules placed in the
    other compartments)."""
    code = list(code)
    return (*_SYSTEM_READ, *interpreter_paths(), *placed_code(code, placed, elsewhere))


def _prelist_app_code(code: Iterable[str]) -> None:
    """List the app's code directories for the import system now, while they can be: past the
    restriction each may not be listed, and its finder would then find nothing in it."""
    for path in app_code(code):
        if os.path.isdir(path):
            finder = _ListedBeforeRestriction(path, *_LOADERS)
            finder.find_spec("flexos-prelist")  # fills the listing (no module has this name)
            for entry in {path, *(written for written in code if os.path.abspath(written) == path)}:
                sys.path_importer_cache[entry] = finder


_LOADERS = (
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


class _ListedBeforeRestriction(importlib.machinery.FileFinder):
    """A FileFinder that keeps its listing when Landlock refuses a new one (the directory changed
    after the restriction: the app wrote a file beside its code)."""

    def _fill_cache(self) -> None:
        before: set[str] = getattr(self, "_path_cache", set())
        super()._fill_cache()  # type: ignore[misc]
        if before and not getattr(self, "_path_cache", None):
            self._path_cache = before


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version this kernel enforces (0: none, or unknown system call numbers
    on this architecture), asked of the kernel itself."""
    answer = _linux.landlock_abi()
    return max(answer[0], 0) if answer is not None else 0


def restrict_filesystem(
    read: Iterable[str],
    write: Iterable[str],
    code: Iterable[str] = (),
    placed: Iterable[str] = (),
    elsewhere: Iterable[str] = (),
) -> None:
    """Allow only ``read``/``write`` (and, read-only, what Python needs and where in ``code``, the
    app's ``sys.path``, the modules ``placed`` in this compartment live) from now on.

    landlock_restrict_self() binds the calling thread and the threads it starts later, so this
    runs before the compartment starts any thread.
    """
    create = _linux.syscall_number("landlock_create_ruleset")
    add_rule = _linux.syscall_number("landlock_add_rule")
    restrict = _linux.syscall_number("landlock_restrict_self")
    if create is None or add_rule is None or restrict is None:
        raise HardeningError(f"filesystem: Landlock's system call numbers on {_linux.arch()} are unknown to flexos")
    abi = landlock_abi()
    if abi < 1:
        raise HardeningError("filesystem: this kernel does not enforce Landlock (compiled out or disabled)")
    handled = _FS_RIGHTS_BY_ABI[max(v for v in _FS_RIGHTS_BY_ABI if v <= abi)]
    writable = handled & ~_IOCTL_DEV
    attr = _RulesetAttr(handled_access_fs=handled, scoped=_SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 8
    ruleset, error = _linux.syscall(create, ctypes.byref(attr), size, 0)
    if error:
        raise HardeningError(f"filesystem: landlock_create_ruleset failed: {os.strerror(error)}")
    code = list(code)
    _prelist_app_code(code)
    try:
        for path in always_readable(code, placed, elsewhere):  # what exists of these (sys.path may list zips)
            _allow(add_rule, ruleset, os.path.abspath(path), _READ & handled, required=False)
        for kind, paths, rights in (("read", read, _READ), ("write", write, writable)):
            for path in paths:  # the operator's own list: a missing path is a mistake, said now
                _allow(add_rule, ruleset, os.path.abspath(path), rights & handled, required=kind)
        _, error = _linux.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if not error:
            _, error = _linux.syscall(restrict, ruleset, 0)
        if error:
            raise HardeningError(f"filesystem: landlock_restrict_self failed: {os.strerror(error)}")
    finally:
        os.close(ruleset)


def _allow(add_rule: int, ruleset: int, path: str, rights: int, required: str | bool) -> None:
    """Allow ``rights`` beneath ``path``; a missing path is skipped unless ``required`` (then it
    names the option the path came from, for the error)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            raise HardeningError(
                f"filesystem.{required}: {path} does not exist (Landlock allows paths that exist when the "
                "compartment starts: create it first)"
            ) from None
        return
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS
        rule = _PathBeneathAttr(allowed_access=rights, parent_fd=fd)
        _, error = _linux.syscall(add_rule, ruleset, _linux.LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
        if error:
            raise HardeningError(f"filesystem: cannot allow {path}: {os.strerror(error)}")
    finally:
        os.close(fd)


# -- seccomp ------------------------------------------------------------------------------------------
# compute-only: no new programs, processes, sockets, tracing, namespaces, mounts, kernel modules,
# or io_uring (which would bypass the filter). Threads remain (clone with CLONE_THREAD).
SECCOMP_PROFILES: dict[str, tuple[str, ...]] = {
    "compute-only": (
        "execve", "execveat", "fork", "vfork",
        "socket", "connect", "bind", "listen", "accept", "accept4",
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
        "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "open_by_handle_at",
        "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
        "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
        "swapon", "swapoff", "io_uring_setup", "io_uring_enter", "io_uring_register",
    ),
}  # fmt: skip
# What a profile refuses but for one argument value: (system call, argument index, the value allowed,
# what that value means).
# compute-only keeps AF_UNIX socketpair(): asyncio's event loop wakes itself through one, and such
# a pair reaches nothing outside the process.
SECCOMP_UNLESS: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    "compute-only": (("socketpair", 0, socket.AF_UNIX, "AF_UNIX"),),
}


def seccomp_policy(policy: dict[str, Any]) -> dict[str, Any] | None:
    """The seccomp filter to load: the declared one, plus the fork family for ``processes: 0``."""
    declared = policy.get("seccomp")
    if (policy.get("limits") or {}).get("processes") != 0:
        return declared
    merged = dict(declared or {"profile": None, "deny": [], "allow": []})
    merged["deny"] = [*merged.get("deny", []), "fork", "vfork"]
    merged["allow"] = [name for name in merged.get("allow", []) if name not in ("fork", "vfork")]
    return merged


def seccomp_denied(policy: dict[str, Any]) -> list[str]:
    """The system calls a seccomp ``policy`` (of :func:`seccomp_policy`) answers with EPERM."""
    deny = set(SECCOMP_PROFILES.get(policy.get("profile") or "", ())) | set(policy.get("deny") or ())
    return sorted(deny - set(policy.get("allow") or ()))


def seccomp_denied_unless(policy: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(system call, argument, allowed value, its meaning): what the profile refuses but for one value,
    unless the policy's own lists say otherwise for that call."""
    decided = set(policy.get("deny") or ()) | set(policy.get("allow") or ())
    return [rule for rule in SECCOMP_UNLESS.get(policy.get("profile") or "", ()) if rule[0] not in decided]


def seccomp_library() -> Any:
    """Load libseccomp. Do it before Landlock: finding the library needs the filesystem."""
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # libseccomp.so missing
        raise HardeningError(f"seccomp: libseccomp is not available: {exc}") from None
    return pyseccomp


def apply_seccomp(policy: dict[str, Any], seccomp: Any) -> None:
    """Load a filter answering the denied system calls with EPERM (runs before any thread).

    Its rules are the native ABI's; a call through any other the kernel takes from this process
    (x32 or i386 on x86_64) is answered ENOSYS, as by a kernel without that ABI. libseccomp's
    default would kill the calling thread, leaving the app's call unanswered."""
    deny = set(seccomp_denied(policy))
    arch = seccomp.system_arch()
    for name in sorted(deny):
        if seccomp.resolve_syscall(arch, name) < 0:
            raise HardeningError(f"seccomp: {name!r} is not a system call on this machine")
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        rules.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ERRNO(errno.ENOSYS))
        for name in sorted(deny):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
        for name, argument, allowed, _meaning in seccomp_denied_unless(policy):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name, seccomp.Arg(argument, seccomp.NE, allowed))
        if "fork" in deny:  # a process is clone() without CLONE_THREAD; clone3 hides its flags
            rules.add_rule(
                seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _linux.CLONE_THREAD, 0)
            )
            rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # the C library falls back to clone
        rules.load()
    except OSError as exc:
        raise HardeningError(f"seccomp: loading the filter failed: {exc}") from None


def needed_features(hardening: dict[str, Any]) -> list[tuple[str, str]]:
    """(option, machine feature of flexos.probe) pairs a compartment's ``hardening`` depends on."""
    needed = []
    if hardening.get("network") == "none":
        needed += [("network: none", "userns"), ("network: none", "netns")]
    if hardening.get("filesystem") is not None:
        needed.append(("filesystem", "landlock"))
    if hardening.get("seccomp") is not None:
        needed.append(("seccomp", "seccomp"))
    if (hardening.get("limits") or {}).get("processes") == 0:
        needed.append(("limits.processes", "seccomp"))
    return needed


def effective_policy(
    hardening: dict[str, Any], code: Iterable[str] = (), placed: Iterable[str] = (), elsewhere: Iterable[str] = ()
) -> dict[str, Any]:
    """What a compartment with ``hardening`` is held to once started, flexos's additions included
    (each read path with why it is there), as plain data: ``flexos check`` prints it."""
    filesystem = hardening.get("filesystem")
    if filesystem is None:
        read: list[dict[str, str]] | None = None
        write: list[dict[str, str]] | None = None
    else:
        code = list(code)
        why = (
            [(path, "the interpreter's shared libraries and devices") for path in _SYSTEM_READ]
            + [
                (path, "the interpreter's own code (standard library, site-packages, flexos)")
                for path in interpreter_paths()
            ]
            + [
                (path, "where the modules placed here and their imports live")
                for path in placed_code(code, placed, elsewhere)
            ]
            + [(path, "hardening.filesystem.read") for path in filesystem["read"]]
        )
        read = [{"path": path, "why": reason} for path, reason in why]
        write = [{"path": path, "why": "hardening.filesystem.write"} for path in filesystem["write"]]
    filter_policy = seccomp_policy(hardening)
    exact, _ = expand_events((hardening.get("audit") or {}).get("deny", []))
    return {
        "read": read,
        "write": write,
        "seccomp_deny": seccomp_denied(filter_policy) if filter_policy is not None else None,
        "seccomp_deny_unless": [
            {"call": name, "argument": argument, "allowed": allowed, "meaning": meaning}
            for name, argument, allowed, meaning in (seccomp_denied_unless(filter_policy) if filter_policy else [])
        ],
        "audit_deny": sorted(exact),
        "network": hardening.get("network", "allow"),
        "env": "inherit" if environment(hardening) is None else sorted(environment(hardening) or ()),
        "limits": {key: value for key, value in (hardening.get("limits") or {}).items() if value is not None},
    }


# -- denials that say which setting caused them ------------------------------------------------------
def _human(size: int) -> str:
    """bytes in the largest binary unit that writes them exactly (flexos.config.human_size, which
    a compartment does not import)."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"


def _seccomp_reason(hardening: dict[str, Any], origins: dict[str, str]) -> str:
    """Why an EPERM can be the seccomp filter's: what it is made of and where, a few of the calls
    it refuses (``flexos check`` lists them all)."""
    declared = hardening.get("seccomp") or {}
    denied = seccomp_denied(seccomp_policy(hardening) or {})
    known: tuple[str, ...] = ("execve", "fork", "socket", "connect", "ptrace")
    named = [call for call in known if call in denied][:4]
    named += [call for call in denied if call not in named][: 4 - len(named)]
    more = f" and {len(denied) - len(named)} more" if len(denied) > len(named) else ""
    parts = [f"profile {declared['profile']}"] if declared.get("profile") else []
    parts += [f"{key}: {', '.join(declared[key])}" for key in ("deny", "allow") if declared.get(key)]
    if declared:
        parts.append(origins.get("seccomp", "?"))
    if (hardening.get("limits") or {}).get("processes") == 0:
        parts.append(f"limits.processes: 0, {origins.get('limits.processes', '?')}")
    setting = "hardening.seccomp" if declared else "hardening.limits.processes"
    return (
        f"{setting} ({'; '.join(parts)}) answers EPERM to the system calls {', '.join(named)}{more} "
        "(flexos check lists them all)"
    )


_DENIAL_TOOL = 4  # a sys.monitoring tool id free of debuggers (0), coverage (1), profilers (2), optimizers (5)


def explain_denials(
    compartment: str,
    hardening: dict[str, Any],
    origins: dict[str, str],
    boundary: types.CodeType,
    on_denial: Callable[[str], None] = lambda note: None,
) -> None:
    """Note, on an error a call returns to the caller, which setting of ``hardening`` can have caused
    it and where it is written (``origins``: ``filesystem``, ``seccomp``, ``network``,
    ``limits.memory``, ``limits.processes`` -> ``FILE:LINE``), as audit denials say theirs:
    Landlock's EACCES, seccomp's EPERM, an isolated network's ENETUNREACH, a MemoryError under
    ``limits.memory``. Only exceptions the code ``boundary`` (the gate's dispatcher) catches are
    explained; the callback runs when an exception is caught (an identity test for any other),
    never on a call that raises nothing."""
    monitoring = getattr(sys, "monitoring", None)
    where = f"compartment {compartment!r} is sandboxed"
    by_errno: dict[int, str] = {}
    if hardening.get("filesystem") is not None:
        by_errno[errno.EACCES] = (
            "{filename} is not under hardening.filesystem.read (or .write, to write it) "
            f"({origins.get('filesystem', '?')})"
        )
    if hardening.get("seccomp") is not None or (hardening.get("limits") or {}).get("processes") == 0:
        by_errno[errno.EPERM] = _seccomp_reason(hardening, origins)
    if hardening.get("network") == "none":
        by_errno[errno.ENETUNREACH] = (
            f"hardening.network is none ({origins.get('network', '?')}): it has a network namespace of its own, only lo"
        )
    memory = (hardening.get("limits") or {}).get("memory")
    if monitoring is None or not (by_errno or memory):
        return
    memory_reason = (
        f"hardening.limits.memory holds it to {_human(memory or 0)} of data ({origins.get('limits.memory', '?')})"
    )

    def handled(code: types.CodeType, offset: int, exc: BaseException) -> None:
        if code is not boundary:
            return
        if type(exc) is MemoryError and memory:
            why = memory_reason
        elif isinstance(exc, OSError) and exc.errno in by_errno:
            why = by_errno[exc.errno].format(filename=exc.filename if exc.filename is not None else "the path")
        else:
            return
        note = f"{where}: {why}"
        try:
            if note not in getattr(exc, "__notes__", ()):
                exc.add_note(note)
                on_denial(f"denied: {type(exc).__name__}: {exc}; {note}")
        except MemoryError:
            pass

    monitoring.use_tool_id(_DENIAL_TOOL, "flexos denials")
    monitoring.register_callback(_DENIAL_TOOL, monitoring.events.EXCEPTION_HANDLED, handled)
    monitoring.set_events(_DENIAL_TOOL, monitoring.events.EXCEPTION_HANDLED)  # a global event only
