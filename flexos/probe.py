"""What this machine's kernel and CPU really offer to isolate and harden compartments.

Each probe asks the kernel (a syscall, an ioctl, a throwaway child process) instead of guessing
from version numbers: distributions backport, disable at boot and compile out features
independently of ``uname -r``. Every probe is a pure function returning a :class:`Feature`, is
quick (well under half a second), and leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flexos import _linux


@dataclass(frozen=True)
class Feature:
    """One machine feature: whether it can be used here, and a sentence saying why (not)."""

    name: str
    available: bool
    detail: str


_KVM_GET_API_VERSION = 0xAE00
# How long a probe child may take. Generous: a fork of a large process on a loaded machine can
# take a good part of a second, and a probe that gives up early reports a feature as missing.
_CHILD_TIMEOUT_S = 3.0


def _linux_only(name: str) -> Callable[[Callable[[], Feature]], Callable[[], Feature]]:
    """Probe feature ``name`` only on Linux; elsewhere it is unavailable, and the detail says so."""

    def decorate(probe: Callable[[], Feature]) -> Callable[[], Feature]:
        @functools.wraps(probe)
        def probe_on_linux() -> Feature:
            if not sys.platform.startswith("linux"):
                return Feature(name, False, f"not Linux ({sys.platform}): flexos runs on Linux only")
            return probe()

        return probe_on_linux

    return decorate


def _errno_name(number: int) -> str:
    return errno.errorcode.get(number, f"errno {number}")


def _status_field(name: str) -> str | None:
    """A field of /proc/self/status, or None if the kernel does not report it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    except OSError:
        pass
    return None


def _libseccomp_version(path: str) -> str | None:
    """The version of the libseccomp at ``path`` if it loads, else None (``?`` if it is too old to say)."""
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        library.seccomp_version.restype = ctypes.POINTER(Version)
    except AttributeError:  # libseccomp < 2.3 has no seccomp_version()
        return "?"
    version = library.seccomp_version().contents
    return f"{version.major}.{version.minor}.{version.micro}"


@_linux_only("seccomp")
def seccomp() -> Feature:
    """Seccomp filters: the kernel must accept them and libseccomp must load to build them."""
    mode, mode_errno = _linux.prctl(_linux.PR_GET_SECCOMP)
    if mode_errno:
        kernel_ok = False
        kernel = f"the kernel has no seccomp (prctl(PR_GET_SECCOMP) failed: {_errno_name(mode_errno)})"
    else:
        # The probe systemd uses: installing a NULL filter faults (EFAULT) only where filters exist;
        # nothing is installed either way.
        _, set_errno = _linux.prctl(_linux.PR_SET_SECCOMP, _linux.SECCOMP_MODE_FILTER, 0)
        kernel_ok = set_errno == errno.EFAULT
        if kernel_ok:
            kernel = "the kernel accepts seccomp filters"
            if mode == _linux.SECCOMP_MODE_FILTER:
                kernel += " (this process already runs under one)"
        else:
            kernel = (
                "the kernel has seccomp but no filter mode "
                f"(PR_SET_SECCOMP with a NULL filter gave {_errno_name(set_errno) if set_errno else 'success'})"
            )
        if _status_field("Seccomp") is None:
            kernel += "; /proc/self/status has no Seccomp: line"
    library_path = ctypes.util.find_library("seccomp")
    version = _libseccomp_version(library_path) if library_path else None
    if library_path is None:
        library = "libseccomp is not installed (apt install libseccomp2)"
    elif version is None:
        library = f"{library_path} was found but does not load"
    else:
        library = f"libseccomp {version} loads ({library_path})"
    return Feature("seccomp", kernel_ok and version is not None, f"{kernel}; {library}")


@_linux_only("landlock")
def landlock() -> Feature:
    """Landlock: its ABI version, asked of the kernel with ``landlock_create_ruleset``."""
    answer = _linux.landlock_abi()
    if answer is None:
        return Feature("landlock", False, f"not probed: unknown syscall number on {_linux.arch()}")
    abi, error = answer
    if not error:
        return Feature("landlock", True, f"Landlock ABI {abi} enabled")
    if error == errno.ENOSYS:
        return Feature("landlock", False, "Landlock is not compiled into this kernel (CONFIG_SECURITY_LANDLOCK)")
    if error == errno.EOPNOTSUPP:
        return Feature("landlock", False, "Landlock compiled in but disabled (add landlock to the lsm= boot parameter)")
    return Feature("landlock", False, f"landlock_create_ruleset failed: {_errno_name(error)}")


def _report_from_child(child_main: Callable[[], str]) -> str:
    """Run ``child_main`` in a throwaway forked child and return the report string it returns.

    What the child does to itself (namespaces it enters, kernel state it dirties) dies with it.
    A child that hangs is killed after ``_CHILD_TIMEOUT_S``; every outcome comes back as a report:
    ``ok ...``, or ``fail STEP ERRNO`` / ``fail STEP message``.
    """
    reader, writer = os.pipe()
    try:
        with warnings.catch_warnings():
            # fork() in a threaded process warns of deadlocks; the child only makes raw os calls,
            # and a child that hangs anyway is killed after _CHILD_TIMEOUT_S.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                pid = os.fork()
            except OSError as exc:
                return f"fail fork {exc.errno}"
        if pid == 0:
            exit_code = 1
            try:
                os.close(reader)
                os.write(writer, child_main().encode())
                exit_code = 0
            finally:
                os._exit(exit_code)
        os.close(writer)
        writer = -1
        return _wait_for_report(pid, reader)
    finally:
        os.close(reader)
        if writer != -1:
            os.close(writer)


def _wait_for_report(pid: int, reader: int) -> str:
    """Wait (bounded) for the probe child and return what it wrote; kill it if it hangs."""
    deadline = time.monotonic() + _CHILD_TIMEOUT_S
    status = None
    while status is None:
        done, status_now = os.waitpid(pid, os.WNOHANG)
        if done:
            status = status_now
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return f"fail timeout the probe child did not finish within {_CHILD_TIMEOUT_S} s"
        else:
            time.sleep(0.001)
    report = os.read(reader, 4096).decode(errors="replace")
    if not report:
        return f"fail crash the probe child ended without a report ({_describe_status(status)})"
    return report


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _unshare_function() -> Callable[[int], None]:
    """``os.unshare`` (Python 3.12+) or libc's, resolved before forking: the child should not dlopen."""
    if hasattr(os, "unshare"):
        return os.unshare
    libc_unshare = _linux.libc().unshare

    def unshare(flags: int) -> None:
        if libc_unshare(ctypes.c_int(flags)) == -1:
            number = ctypes.get_errno()
            raise OSError(number, os.strerror(number))

    return unshare


def _child_unshare(unshare: Callable[[int], None], flags: int, map_ids: bool) -> str:
    """In the forked child: enter new namespaces; ``ok INTERFACES`` or ``fail STEP ERRNO``.

    Only os-level calls: the parent may have had other threads, whose locks the child inherits held.
    """
    step = "unshare"
    try:
        uid, gid = os.getuid(), os.getgid()  # after unshare they read as the overflow id
        unshare(flags)
        if map_ids:
            step = "uid_map"
            for path, line in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                fd = os.open(f"/proc/self/{path}", os.O_WRONLY)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        interfaces = ""
        if flags & _linux.CLONE_NEWNET:
            step = "net/dev"
            fd = os.open("/proc/self/net/dev", os.O_RDONLY)
            try:
                text = os.read(fd, 65536).decode()
            finally:
                os.close(fd)
            interfaces = ",".join(line.split(":")[0].strip() for line in text.splitlines()[2:] if ":" in line)
        return f"ok {interfaces}"
    except OSError as exc:
        return f"fail {step} {exc.errno}"


def _try_unshare(flags: int, map_ids: bool) -> str:
    """Enter namespaces ``flags`` in a throwaway child; its report (see ``_child_unshare``)."""
    unshare = _unshare_function()
    return _report_from_child(lambda: _child_unshare(unshare, flags, map_ids))


def _failure(report: str) -> str:
    """``fail STEP ERRNO`` (or ``fail STEP message``) as a sentence part."""
    _, step, rest = report.split(" ", 2)
    reason = _errno_name(int(rest)) if rest.isdigit() else rest
    if step == "unshare":
        return f"unshare failed: {reason}"
    if step == "uid_map":
        return f"created, but mapping this user into it failed: {reason}"
    if step == "net/dev":
        return f"created, but /proc/self/net/dev could not be read: {reason}"
    if step == "fork":
        return f"could not fork a probe child: {reason}"
    return reason


@_linux_only("userns")
def user_namespaces() -> Feature:
    """User namespaces: a child really unshares one and maps this user to root inside it."""
    report = _try_unshare(_linux.CLONE_NEWUSER, map_ids=True)
    who = f"uid {os.getuid()}"
    if report.startswith("ok"):
        return Feature("userns", True, f"a new user namespace works (created as {who}, mapped to root inside)")
    return Feature("userns", False, f"no user namespace as {who}: {_failure(report)}")


@_linux_only("netns")
def network_namespaces() -> Feature:
    """Network namespaces: a child really unshares one (inside a user namespace, as ``unshare -Urn``)."""
    report = _try_unshare(_linux.CLONE_NEWUSER | _linux.CLONE_NEWNET, map_ids=False)
    how = "with a new user namespace"
    if report.startswith("fail unshare"):
        first_failure = _failure(report)
        report = _try_unshare(_linux.CLONE_NEWNET, map_ids=False)  # root may have netns without userns
        how = "without a user namespace (needs CAP_SYS_ADMIN)"
        if not report.startswith("ok"):
            return Feature(
                "netns", False, f"no network namespace: {first_failure} (with a user namespace), {_failure(report)}"
            )
    if not report.startswith("ok"):
        return Feature("netns", False, f"no network namespace: {_failure(report)}")
    interfaces = [name for name in report[3:].split(",") if name]
    if interfaces == ["lo"]:
        inside = "it has only lo"
    else:
        inside = f"it has interfaces: {', '.join(interfaces) or 'none'}"
    return Feature("netns", True, f"a new network namespace works ({how}); {inside}")


def kvm_backend() -> str | None:
    """The loaded KVM module (kvm_intel, kvm_amd, or kvm_pvm, which cannot boot a stock kernel), if known."""
    modules = Path("/sys/module")
    for module in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if (modules / module).exists():
            return module
    return None


def _kvm_backend() -> str:
    backend = kvm_backend()
    if backend == "kvm_pvm":
        return "; backend kvm_pvm (nested PVM: guests need a PVM-enabled kernel)"
    return f"; backend {backend}" if backend else ""


@_linux_only("kvm")
def kvm() -> Feature:
    """KVM: /dev/kvm opens read-write and answers KVM_GET_API_VERSION."""
    import fcntl  # POSIX only: imported here, so that the probe imports (and says "not Linux") anywhere

    path = "/dev/kvm"
    if not os.path.exists(path):
        return Feature("kvm", False, "no /dev/kvm (KVM not loaded, or no hardware virtualization here)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return Feature("kvm", False, f"/dev/kvm present but cannot be opened read-write: {_errno_name(exc.errno or 0)}")
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return Feature("kvm", False, f"/dev/kvm opened but KVM_GET_API_VERSION failed: {_errno_name(exc.errno or 0)}")
    finally:
        os.close(fd)
    return Feature("kvm", True, f"/dev/kvm present (API version {version}){_kvm_backend()}")


def _cpu_flags() -> set[str] | None:
    """The CPU flags from /proc/cpuinfo, or None if it cannot be read."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        return None
    return set()


def _child_pkey_alloc(pkey_alloc: int, pkey_free: int) -> str:
    """In the forked child: allocate a protection key and free it; ``ok`` or ``fail pkey_alloc ERRNO``."""
    key, error = _linux.syscall(pkey_alloc, 0, 0)
    if error:
        return f"fail pkey_alloc {error}"
    _linux.syscall(pkey_free, key)
    return "ok"


@_linux_only("pku")
def pku() -> Feature:
    """Memory protection keys: the CPU must have them and the kernel must hand one out (pkey_alloc)."""
    flags = _cpu_flags()
    problems = []
    if flags is None:
        problems.append("/proc/cpuinfo cannot be read")
    elif "pku" not in flags:
        problems.append("no 'pku' flag in /proc/cpuinfo")
    pkey_alloc, pkey_free = _linux.syscall_number("pkey_alloc"), _linux.syscall_number("pkey_free")
    if pkey_alloc is None or pkey_free is None:
        problems.append(f"pkey_alloc not probed: unknown syscall number on {_linux.arch()}")
    else:
        # In a child, so every call sees a fresh process: without PKU, a failed pkey_alloc makes
        # the next one in the same process fail with ENOSPC instead of EINVAL (seen on Linux 6.18).
        _linux.libc()  # loaded before forking: the child should not dlopen
        report = _report_from_child(lambda: _child_pkey_alloc(pkey_alloc, pkey_free))
        if not report.startswith("ok"):
            _, _, rest = report.split(" ", 2)
            reason = f"with {_errno_name(int(rest))}" if rest.isdigit() else f"({rest})"
            problems.append(f"pkey_alloc failed {reason}")
    if problems:
        return Feature("pku", False, "; ".join(problems))
    return Feature("pku", True, "the CPU has PKU and pkey_alloc hands out keys")


def machine_report() -> list[Feature]:
    """Every feature, probed now, in the order ``flexos check`` prints them."""
    return [seccomp(), landlock(), user_namespaces(), network_namespaces(), kvm(), pku()]


# -- what a subinterpreter of this interpreter refuses to load ------------------------------------
# Runs in a throwaway interpreter process: loads each extension module's file (its init only, not
# its package's Python code) in a fresh isolated subinterpreter, and prints those refused.
_SUBINTERPRETER_PROBE = """
import _interpreters, json, sys
refused = {}
for name, path in json.loads(sys.argv[1]).items():
    interp = _interpreters.create()
    try:
        failure = _interpreters.exec(interp, (
            "import importlib.util\\n"
            f"spec = importlib.util.spec_from_file_location({name!r}, {path!r})\\n"
            "importlib.util.module_from_spec(spec)\\n"
        ))
        if failure is not None and "subinterpreters" in str(failure.msg):
            refused[name] = str(failure.msg)
    finally:
        _interpreters.destroy(interp)
print(json.dumps(refused))
"""


def subinterpreter_refuses(extensions: dict[str, str]) -> dict[str, str]:
    """Of these extension modules (name -> file), those a subinterpreter with its own GIL refuses
    (single-phase init, or no per-interpreter-GIL support declared), with the interpreter's reason.
    Found by loading each in a throwaway process (their init runs there, not their package)."""
    import json
    import subprocess

    if not extensions or sys.version_info < (3, 13):
        return {}
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-c", _SUBINTERPRETER_PROBE, json.dumps(extensions)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {}  # the import at boot still refuses, with the same reason
