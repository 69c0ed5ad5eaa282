"""Per-compartment hardening: what FlexOS does with UBSan/KASan/stack protector per library, done
with the Linux and Python mechanisms a Python compartment can use.

Declared under ``hardening:`` of a ``process`` compartment in flexos.yaml and applied inside the
compartment's process before any component code runs (flexos/runtime/child.py calls these in
order). A requested protection that cannot be applied stops the compartment from starting: it
never runs unhardened.

- ``env: clean``       the process starts with an empty environment (no inherited secrets);
- ``network: none``    a new user + network namespace: no interface but a loopback that is down;
- ``filesystem``       Landlock: only the listed paths (plus what Python itself needs, read-only)
                       can be read or written; with Landlock ABI >= 6 the compartment also cannot
                       signal processes outside it (the app);
- ``seccomp``          a seccomp filter in the kernel: named profiles (``compute-only``) and
                       deny/allow lists of system calls, answered with EPERM;
- ``limits``           rlimits: ``memory`` (RLIMIT_DATA), ``cpu_seconds`` (RLIMIT_CPU),
                       ``open_files`` (RLIMIT_NOFILE); ``processes: 0`` through seccomp;
- ``audit: {deny}``    a Python audit hook refusing the listed events (PEP 578) when component
                       code is on the stack; a library's own ``hardening.audit`` applies when that
                       library's code is the innermost component frame.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import sys
from collections.abc import Iterable, Iterator
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
    """The environment to start the compartment process with (None: inherit the app's)."""
    return dict(CLEAN_ENVIRONMENT) if hardening.get("env") == "clean" else None


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


def _acting_code(frame: Any) -> str | None:
    """The module whose code caused an event: the innermost component frame's. None when that is
    flexos's own machinery, or when only the standard library is on the stack."""
    for module, _ in acting_frames(frame):
        return module
    return None


def _owning_library(module: str, libraries: dict[str, Any]) -> str | None:
    """The per-library entry covering ``module`` (longest dotted prefix), if any."""
    name = module
    while name:
        if name in libraries:
            return name
        name = name.rpartition(".")[0]
    return None


def install_audit_policy(deny: list[str], compartment: str, libraries: dict[str, list[str]] | None = None) -> None:
    """Refuse denied audit events raised on behalf of component code: the compartment's for any
    component, a library's for that library's own code (the innermost frame outside the standard
    library). Events flexos's own gate machinery raises (sending a channel's descriptors, reaching
    a sibling) are not the component's. Audit hooks cannot be removed, so the policy holds for
    the life of the process."""
    exact, prefixes = expand_events(deny)
    per_library = {name: expand_events(events) for name, events in (libraries or {}).items()}
    watched = frozenset(exact.union(*(events for events, _ in per_library.values())))
    watched_prefixes = tuple(f"{event}." for event in watched)
    if not watched:
        return

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event not in watched and not event.startswith(watched_prefixes):
            return
        innermost = _acting_code(sys._getframe(1))
        if innermost is None:
            return  # flexos's own machinery, or the standard library alone: never component code
        if event in exact or event.startswith(prefixes):
            raise PermissionError(f"{event!r} is denied in compartment {compartment!r} (flexos.yaml hardening.audit)")
        library = _owning_library(innermost, per_library)
        if library is not None:
            library_exact, library_prefixes = per_library[library]
            if event in library_exact or event.startswith(library_prefixes):
                raise PermissionError(
                    f"{event!r} is denied for library {library!r} (flexos.yaml libraries.{library}.hardening.audit)"
                )

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


def always_readable() -> tuple[str, ...]:
    """What a ``filesystem``-restricted compartment may read besides its allowlist: the system's
    libraries and devices, the interpreter, its standard library and site-packages, the app's
    ``sys.path``, and flexos itself (an editable install is reached through a finder, not a
    sys.path entry, and a compartment imports a driver module when it first reaches a sibling)."""
    python_paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path, os.path.dirname(os.__file__), _FLEXOS}
    return (*_SYSTEM_READ, *sorted(python_paths))


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


def restrict_filesystem(read: Iterable[str], write: Iterable[str]) -> None:
    """Allow only ``read``/``write`` (and what Python needs, read-only) from now on.

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
    try:
        for path in always_readable():  # what exists of these (sys.path may list zips)
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
        "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
        "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd",
        "setns", "unshare", "mount", "umount2", "pivot_root", "chroot", "open_by_handle_at",
        "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
        "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
        "swapon", "swapoff", "io_uring_setup", "io_uring_enter", "io_uring_register",
    ),
}  # fmt: skip


def seccomp_policy(policy: dict[str, Any]) -> dict[str, Any] | None:
    """The seccomp filter to load: the declared one, plus the fork family for ``processes: 0``."""
    declared = policy.get("seccomp")
    if (policy.get("limits") or {}).get("processes") != 0:
        return declared
    merged = dict(declared or {"profile": None, "deny": [], "allow": []})
    merged["deny"] = [*merged.get("deny", []), "fork", "vfork"]
    merged["allow"] = [name for name in merged.get("allow", []) if name not in ("fork", "vfork")]
    return merged


def seccomp_library() -> Any:
    """Load libseccomp. Do it before Landlock: finding the library needs the filesystem."""
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # libseccomp.so missing
        raise HardeningError(f"seccomp: libseccomp is not available: {exc}") from None
    return pyseccomp


def apply_seccomp(policy: dict[str, Any], seccomp: Any) -> None:
    """Load a filter answering the denied system calls with EPERM (runs before any thread)."""
    deny = set(SECCOMP_PROFILES.get(policy.get("profile") or "", ())) | set(policy.get("deny") or ())
    deny -= set(policy.get("allow") or ())
    arch = seccomp.system_arch()
    for name in sorted(deny):
        if seccomp.resolve_syscall(arch, name) < 0:
            raise HardeningError(f"seccomp: {name!r} is not a system call on this machine")
    try:
        rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in sorted(deny):
            rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
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
