"""Per-compartment hardening: what FlexOS does with UBSan/KASan/stack protector per library, done
with the Linux and Python mechanisms a Python compartment can use.

Declared under ``hardening:`` of a ``process`` compartment in flexos.yaml and applied inside the
compartment's process before any component code runs (flexos/compartment.py calls these in
order). A requested protection that cannot be applied stops the compartment from starting: it
never runs unhardened.

- ``env: clean``       the process starts with an empty environment (no inherited secrets);
- ``network: none``    a new user + network namespace: no interface but a loopback that is down;
- ``limits``           rlimits: ``memory`` (RLIMIT_DATA), ``cpu_seconds`` (RLIMIT_CPU),
                       ``open_files`` (RLIMIT_NOFILE);
- ``audit: {deny}``    a Python audit hook refusing the listed events (PEP 578) when component
                       code is on the stack.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable
from typing import Any

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
_MACHINERY = frozenset({"flexos", "msgpack"})
CLEAN_ENVIRONMENT = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class HardeningError(RuntimeError):
    """A requested protection could not be applied; the compartment must not start."""


def environment(hardening: dict[str, Any]) -> dict[str, str] | None:
    """The environment to start the compartment process with (None: inherit the app's)."""
    return dict(CLEAN_ENVIRONMENT) if hardening.get("env") == "clean" else None


def isolate_network() -> None:
    """Enter a new user and network namespace. Must run while the process has one thread."""
    uid, gid = os.getuid(), os.getgid()
    try:
        os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
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
    )
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


def _component_on_stack(frame: Any) -> bool:
    """Whether code other than the standard library and flexos's machinery is running."""
    stdlib = sys.stdlib_module_names
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        top = module.partition(".")[0]
        if top not in stdlib and top not in _MACHINERY and top not in ("__main__", ""):
            return True
        frame = frame.f_back
    return False


def install_audit_policy(deny: list[str], compartment: str) -> None:
    """Refuse the denied events whenever component code is on the stack. Audit hooks cannot be
    removed, so the policy holds for the life of the process."""
    exact, prefixes = expand_events(deny)
    if not exact:
        return

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if (event in exact or event.startswith(prefixes)) and _component_on_stack(sys._getframe(1)):
            raise PermissionError(f"{event!r} is denied in compartment {compartment!r} (flexos.yaml hardening.audit)")

    sys.addaudithook(hook)
