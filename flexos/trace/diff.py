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
from flexos.image import Image
from flexos.trace.propose import Proposal


@dataclass(frozen=True)
class Change:
    text: str
    widens: bool
    why: str | None = None  # what in the runs asks for it (for a change the proposal makes)

    def line(self) -> str:
        mark = "WIDENS " if self.widens else "       "
        return f"  {mark}{self.text}" + (f"\n{'':9}because: {self.why}" if self.why else "")


def _covered(path: str, paths: list[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == os.path.normpath(p) or path.startswith(os.path.normpath(p).rstrip("/") + "/") for p in paths)


def _paths(old: list[str], new: list[str], where: str, why: Any) -> list[Change]:
    changes = [Change(f"{where} + {p}", not _covered(p, old), why(p)) for p in new if p not in old]
    changes += [Change(f"{where} - {p}", False) for p in old if p not in new]
    return changes


def compare(old: Image, new: Image, proposal: Proposal) -> list[Change]:
    """Every difference between ``old`` (the file on disk) and ``new`` (the proposal's image)."""
    grants = {(c.name, g.option, g.value): g.why for c in proposal.compartments for g in c.hardening.grants()}
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
        changes += _hardening(
            name, before.hardening, after.hardening, lambda option, value, n=name: grants.get((n, option, value))
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
            changes.append(Change(f"library {module}: {before_c} -> {after_c}", False))
    for module in sorted(set(old.library_hardening) | set(new.library_hardening)):
        before_d = set((old.library_hardening.get(module) or {}).get("audit", {}).get("deny", []))
        after_d = set((new.library_hardening.get(module) or {}).get("audit", {}).get("deny", []))
        changes += [Change(f"library {module}: audit.deny - {e}", True) for e in sorted(before_d - after_d)]
        changes += [Change(f"library {module}: audit.deny + {e}", False) for e in sorted(after_d - before_d)]
    return changes


def _hardening(name: str, before: dict[str, Any], after: dict[str, Any], why: Any) -> list[Change]:
    where = f"compartment {name}:"
    changes: list[Change] = []
    if not before and not after:
        return changes
    if before and not after:
        return [Change(f"{where} hardening removed", True)]
    if after and not before:
        return [Change(f"{where} hardening added", False)]
    if before.get("env") != after.get("env"):
        changes.append(
            Change(
                f"{where} env {before.get('env')} -> {after.get('env')}",
                after.get("env") != "clean",
                why("env", after.get("env")),
            )
        )
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
                fs_before[key], fs_after[key], f"{where} filesystem.{key}", lambda p, k=key: why(f"filesystem.{k}", p)
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
