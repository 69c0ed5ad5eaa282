"""What a new proposal would change in an existing flexos.yaml, each change marked when it widens
what a compartment may do (a reviewer must say yes to those; ``flexos trace`` never writes them
without ``--write``).

Both sides are compared as flexos.config reads them (Images), so a hand-written file, its
comments and its layout do not matter; only what flexos would enforce does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from flexos.drivers import driver_class
from flexos.image import CompartmentSpec, Image
from flexos.trace.propose import Proposal


@dataclass(frozen=True)
class Change:
    text: str
    widens: bool
    why: str | None = None  # what in the runs asks for it (for a change the proposal makes)

    def line(self) -> str:
        mark = "WIDENS " if self.widens else "       "
        return f"  {mark}{self.text}" + (f"\n{'':9}because: {self.why}" if self.why else "")


def _resolved(path: str, base: str | None) -> str:
    """A granted path as flexos enforces it: ``~`` expanded, a relative one from the yaml's directory."""
    path = os.path.expanduser(path)
    if base is not None and not os.path.isabs(path):
        path = os.path.join(base, path)
    return os.path.normpath(path)


def _covered(path: str, paths: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in paths)


def _paths(old: list[str], new: list[str], where: str, why: Any, base: str | None) -> list[Change]:
    """Path by path, compared as enforced (``.`` in one file is the directory the other names)."""
    old_at = {_resolved(p, base): p for p in old}
    new_at = {_resolved(p, base): p for p in new}
    changes = [
        Change(f"{where} + {written}", not _covered(at, list(old_at)), why(written))
        for at, written in new_at.items()
        if at not in old_at
    ]
    changes += [Change(f"{where} - {written}", False) for at, written in old_at.items() if at not in new_at]
    return changes


def compare(old: Image, new: Image, proposal: Proposal, base: str | None = None) -> list[Change]:
    """Every difference between ``old`` (the file on disk) and ``new`` (the proposal's image);
    relative paths in either are read from ``base``, the yaml's directory."""
    grants = {(c.name, g.option, g.value): g.why for c in proposal.compartments for g in c.hardening.grants()}
    reasons = {(c.name, target): why for c in proposal.compartments for target, why in c.reaches.items()}
    changes: list[Change] = []
    for name in dict.fromkeys([*old.compartments, *new.compartments]):
        before, after = old.compartments.get(name), new.compartments.get(name)
        if before is None and after is not None:
            changes.append(Change(f"+ compartment {name} ({after.driver})", False))
            continue
        if after is None and before is not None:
            changes.append(Change(f"- compartment {name} ({before.driver})", False))
            continue
        assert before is not None and after is not None
        if before.driver != after.driver:
            weaker = driver_class(after.driver).strength < driver_class(before.driver).strength
            changes.append(Change(f"compartment {name}: driver {before.driver} -> {after.driver}", weaker))
        elif before.options != after.options:
            changes.append(Change(f"compartment {name}: mechanism {before.options} -> {after.options}", False))
        changes += _settings(name, before, after, lambda target, n=name: reasons.get((n, target)))
        changes += _hardening(
            name, before.hardening, after.hardening, lambda option, value, n=name: grants.get((n, option, value)), base
        )
    for module in sorted(set(old.libraries) | set(new.libraries)):
        before_c, after_c = old.libraries.get(module), new.libraries.get(module)
        if before_c == after_c:
            continue
        if after_c is None:
            changes.append(Change(f"library {module}: no longer placed (was in {before_c}): it runs in the app", True))
        elif before_c is None:
            changes.append(Change(f"library {module}: placed in {after_c}", False))
        else:
            changes.append(Change(f"library {module}: {before_c} -> {after_c} (with what {after_c} may do)", True))
    for module in sorted(set(old.library_hardening) | set(new.library_hardening)):
        before_d = set((old.library_hardening.get(module) or {}).get("audit", {}).get("deny", []))
        after_d = set((new.library_hardening.get(module) or {}).get("audit", {}).get("deny", []))
        changes += [Change(f"library {module}: audit.deny - {e}", True) for e in sorted(before_d - after_d)]
        changes += [Change(f"library {module}: audit.deny + {e}", False) for e in sorted(after_d - before_d)]
    return changes


def _settings(name: str, before: CompartmentSpec, after: CompartmentSpec, why: Any) -> list[Change]:
    """What a compartment may reach, and its own limits (timeout, replies, restarts)."""
    where = f"compartment {name}:"
    changes: list[Change] = []
    if before.reaches != after.reaches:
        if after.reaches is None:
            changes.append(Change(f"{where} reaches: no longer declared", bool(after.hardening)))
        else:
            for target in after.reaches:
                if before.reaches is None or target not in before.reaches:
                    widens = before.reaches is not None or not before.hardening
                    changes.append(Change(f"{where} reaches + {target}", widens, why(target)))
            for target in before.reaches or ():
                if target not in after.reaches:
                    changes.append(Change(f"{where} reaches - {target}", False))
    if before.timeout != after.timeout:
        looser = after.timeout is None or (before.timeout is not None and after.timeout > before.timeout)
        changes.append(Change(f"{where} timeout {before.timeout} -> {after.timeout}", looser))
    if before.max_reply != after.max_reply:
        changes.append(
            Change(f"{where} max_reply {before.max_reply} -> {after.max_reply}", after.max_reply > before.max_reply)
        )
    if before.restart != after.restart:
        changes.append(Change(f"{where} restart {before.restart} -> {after.restart}", False))
    return changes


def _env_names(env: Any) -> list[str] | None:
    """The app's variables a compartment sees (None: all of them)."""
    if env in (None, "inherit"):
        return None
    return list(env.get("keep", [])) if isinstance(env, dict) else []


def _environment(where: str, before: Any, after: Any, why: Any) -> list[Change]:
    old, new = _env_names(before), _env_names(after)
    if old == new:
        return []
    if new is None:
        return [Change(f"{where} env {_env_text(before)} -> inherit", True, why("env", "inherit"))]
    if old is None:
        return [Change(f"{where} env inherit -> {_env_text(after)}", False)]
    changes = [Change(f"{where} env.keep + {n}", True, why("env.keep", n)) for n in new if n not in old]
    changes += [Change(f"{where} env.keep - {n}", False) for n in old if n not in new]
    return changes


def _env_text(env: Any) -> str:
    return f"{{keep: [{', '.join(env['keep'])}]}}" if isinstance(env, dict) else str(env)


def _hardening(
    name: str, before: dict[str, Any], after: dict[str, Any], why: Any, base: str | None = None
) -> list[Change]:
    where = f"compartment {name}:"
    changes: list[Change] = []
    if not before and not after:
        return changes
    if before and not after:
        return [Change(f"{where} hardening removed", True)]
    if after and not before:
        return [Change(f"{where} hardening added", False)]
    changes += _environment(where, before.get("env"), after.get("env"), why)
    if before.get("network") != after.get("network"):
        widens = after.get("network") != "none"
        changes.append(
            Change(
                f"{where} network {before.get('network')} -> {after.get('network')}",
                widens,
                why("network", after.get("network")),
            )
        )
    fs_before, fs_after = before.get("filesystem"), after.get("filesystem")
    if fs_before is not None and fs_after is None:
        changes.append(Change(f"{where} filesystem allowlist removed (every path)", True))
    elif fs_after is not None and fs_before is None:
        changes.append(Change(f"{where} filesystem allowlist added", False))
    elif fs_before is not None and fs_after is not None:
        for key in ("read", "write"):
            changes += _paths(
                fs_before[key],
                fs_after[key],
                f"{where} filesystem.{key}",
                lambda p, k=key: why(f"filesystem.{k}", p),
                base,
            )
    sc_before, sc_after = before.get("seccomp"), after.get("seccomp")
    if sc_before is not None and sc_after is None:
        changes.append(Change(f"{where} seccomp filter removed", True))
    elif sc_after is not None and sc_before is None:
        changes.append(Change(f"{where} seccomp filter added ({sc_after.get('profile') or 'custom'})", False))
    elif sc_before is not None and sc_after is not None:
        if sc_before.get("profile") != sc_after.get("profile"):
            changes.append(
                Change(
                    f"{where} seccomp profile {sc_before.get('profile')} -> {sc_after.get('profile')}",
                    sc_after.get("profile") is None,
                )
            )
        for call in sorted(set(sc_after.get("allow", [])) - set(sc_before.get("allow", []))):
            changes.append(Change(f"{where} seccomp.allow + {call}", True, why("seccomp.allow", call)))
        for call in sorted(set(sc_before.get("allow", [])) - set(sc_after.get("allow", []))):
            changes.append(Change(f"{where} seccomp.allow - {call}", False))
        for call in sorted(set(sc_before.get("deny", [])) - set(sc_after.get("deny", []))):
            changes.append(Change(f"{where} seccomp.deny - {call}", True))
    deny_before = set((before.get("audit") or {}).get("deny", []))
    deny_after = set((after.get("audit") or {}).get("deny", []))
    changes += [Change(f"{where} audit.deny - {e}", True) for e in sorted(deny_before - deny_after)]
    changes += [Change(f"{where} audit.deny + {e}", False) for e in sorted(deny_after - deny_before)]
    limits_before = {k: v for k, v in (before.get("limits") or {}).items() if v is not None}
    limits_after = {k: v for k, v in (after.get("limits") or {}).items() if v is not None}
    for key in sorted(set(limits_before) | set(limits_after)):
        if limits_before.get(key) != limits_after.get(key):
            changes.append(
                Change(
                    f"{where} limits.{key} {limits_before.get(key)} -> {limits_after.get(key)}", key not in limits_after
                )
            )
    return changes
