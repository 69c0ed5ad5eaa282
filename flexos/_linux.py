"""Linux's interface where Python's ``os`` stops: system call numbers per architecture, prctl and
Landlock constants, and the C library handle. One copy, for the probe and the hardening alike.

System call numbers differ per architecture, and a 32-bit userland on a 64-bit kernel uses another
table. Only the architectures listed in :data:`SYSCALLS` are known to be right: on any other,
:func:`syscall_number` answers None, so a caller says "unknown on ARCH" instead of making a call
whose number may mean something else there. Importing this module touches nothing, so it imports
(and says what it lacks) on any platform.
"""

from __future__ import annotations

import ctypes
import functools
import os

# From the kernel's syscall tables (arch/x86/entry/syscalls/syscall_64.tbl, and the generic table
# include/uapi/asm-generic/unistd.h that aarch64 uses). Landlock came after the tables were unified,
# so its numbers are the same on both.
SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {
        "pkey_alloc": 330,
        "pkey_free": 331,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
    },
    "aarch64": {
        "pkey_alloc": 289,
        "pkey_free": 290,
        "landlock_create_ruleset": 444,
        "landlock_add_rule": 445,
        "landlock_restrict_self": 446,
    },
}

# prctl(2) options and seccomp(2) modes (include/uapi/linux/prctl.h, seccomp.h).
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

# Landlock (include/uapi/linux/landlock.h).
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1

# clone(2) flags; os has the namespace ones only from Python 3.12 on.
CLONE_THREAD = 0x00010000
CLONE_NEWUSER = getattr(os, "CLONE_NEWUSER", 0x10000000)
CLONE_NEWNET = getattr(os, "CLONE_NEWNET", 0x40000000)


def arch() -> str:
    """The architecture whose system call table this interpreter uses (a 32-bit userland differs)."""
    machine = os.uname().machine
    return machine if ctypes.sizeof(ctypes.c_void_p) == 8 else f"{machine} (32-bit userland)"


def syscall_number(name: str, architecture: str | None = None) -> int | None:
    """System call ``name``'s number on ``architecture`` (default: this one), None where unknown."""
    return SYSCALLS.get(architecture or arch(), {}).get(name)


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's C library, with ``errno`` kept for :func:`ctypes.get_errno` (loaded once)."""
    library = ctypes.CDLL(None, use_errno=True)
    library.syscall.restype = ctypes.c_long
    library.prctl.restype = ctypes.c_int
    return library


def _c_arguments(args: tuple[object, ...]) -> list[object]:
    """Integers as C longs (what the kernel reads from each register); pointers and None as they are."""
    return [ctypes.c_long(arg) if isinstance(arg, int) else arg for arg in args]


def syscall(number: int, *args: object) -> tuple[int, int]:
    """``syscall(number, args...)`` → (result, errno); errno is 0 on success."""
    ctypes.set_errno(0)
    result = libc().syscall(ctypes.c_long(number), *_c_arguments(args))
    return result, (ctypes.get_errno() if result == -1 else 0)


def prctl(option: int, *args: int) -> tuple[int, int]:
    """``prctl(option, args...)`` → (result, errno); errno is 0 on success."""
    ctypes.set_errno(0)
    result = libc().prctl(ctypes.c_int(option), *(ctypes.c_ulong(arg) for arg in args))
    return result, (ctypes.get_errno() if result == -1 else 0)


def landlock_abi() -> tuple[int, int] | None:
    """(the Landlock ABI version this kernel enforces, 0), or (-1, errno) if it refuses to say; None
    where this architecture's number for ``landlock_create_ruleset`` is unknown."""
    number = syscall_number("landlock_create_ruleset")
    if number is None:
        return None
    return syscall(number, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
