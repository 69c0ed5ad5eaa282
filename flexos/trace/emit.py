"""A proposal written out: a commented flexos.yaml (every line says what in the runs asked for
it), the predicted cost as a reader wants it, and an explore space starting from the proposed cuts.

The flexos.yaml text follows docs/config.md; ``flexos trace`` validates what it writes with
flexos.config before it writes it.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

from flexos.drivers import driver_class
from flexos.trace.cost import Prediction
from flexos.trace.propose import DEFAULT, Compartment, Grant, Proposal
from flexos.trace.units import library_entries

_PLAIN = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_./-]*$")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain where YAML reads it back as this string, else quoted."""
    if _PLAIN.match(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _comment(text: str, indent: int) -> list[str]:
    """``# text`` at ``indent``, wrapped at 100 columns."""
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and indent + 2 + len(line) + 1 + len(word) > 100:
            lines.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return [" " * indent + "# " + part for part in lines]


def _kib(size: int) -> str:
    return f"{size / 1024:.0f} KiB" if size >= 1024 else f"{size} B"


def _mechanism_line(compartment: Compartment) -> str:
    usable = [name for name, why in compartment.usable.items() if why is None]
    refused = [f"not {name}: {why}" for name, why in compartment.usable.items() if why is not None]
    driver = driver_class(compartment.mechanism)
    how = "its own process, which can be hardened" if driver.hardenable else "the strongest boundary usable here"
    chosen = f"{compartment.mechanism} (chosen: {how})"
    others = [name for name in usable if name != compartment.mechanism]
    return f"can use: {', '.join([chosen, *others])}" + ("; " + "; ".join(refused) if refused else "")


def _grant_lines(key: str, grants: list[Grant], indent: int, empty_why: str) -> list[str]:
    pad = " " * indent
    if not grants:
        return [f"{pad}{key}: []  # {empty_why}"]
    lines = [f"{pad}{key}:"]
    for grant in grants:
        lines += _comment(grant.why, indent + 2)
        lines.append(f"{pad}  - {scalar(grant.value)}")
    return lines


def _hardening_lines(compartment: Compartment) -> list[str]:
    if not driver_class(compartment.mechanism).hardenable:
        return [f"    # no hardening: a {compartment.mechanism} compartment has no process of its own to harden"]
    hardening = compartment.hardening
    if compartment.reaches:
        lines = _comment(
            "a hardened compartment imports from no other unless listed: "
            + "; ".join(f"{target}: {why}" for target, why in compartment.reaches.items()),
            4,
        )
        lines.append(f"    reaches: [{', '.join(compartment.reaches)}]")
    else:
        lines = ["    reaches: []  # imports nothing placed in another compartment"]
    lines.append("    hardening:")
    if hardening.env == "keep":
        lines += _comment(hardening.why["env"], 6) + ["      env:"]
        lines += _grant_lines("keep", hardening.env_keep, 8, "")
    else:
        lines += _comment(hardening.why["env"], 6) + [f"      env: {hardening.env}"]
    lines += _comment(hardening.why["network"], 6) + [f"      network: {hardening.network}"]
    lines.append("      filesystem:")
    lines += _grant_lines("read", hardening.read, 8, "nothing outside Python's own paths and the system libraries")
    lines += _grant_lines("write", hardening.write, 8, "wrote, created and removed nothing")
    if hardening.seccomp_allow:
        lines += _comment("compute-only, but for the system calls below (its sockets and processes make them)", 6)
        lines += ["      seccomp:", "        profile: compute-only"]
        lines += _grant_lines("allow", hardening.seccomp_allow, 8, "")
    else:
        lines += ["      seccomp: compute-only  # spawned no process, opened no socket"]
    kept = [why for option, why in sorted(hardening.why.items()) if option.startswith("audit.")]
    if hardening.audit_deny:
        lines += [f"      audit: {{deny: [{', '.join(hardening.audit_deny)}]}}  # raised none of these events"]
    for why in kept:
        lines += _comment(f"not denied: {why}", 6)
    return lines


def proposal_yaml(proposal: Proposal, prediction: Prediction | None) -> str:
    """The proposal as a commented flexos.yaml."""
    runs = proposal.runs
    lines = [f"# Proposed by `flexos trace` from {len(runs.runs)} run{'s' if len(runs.runs) != 1 else ''}:"]
    lines += [f"#   {run.describe()}" for run in runs.runs]
    lines += _comment(
        "Each line says what in the runs asks for it. What the runs did not do is not allowed, and code "
        "paths they did not take may need more: review it as a policy (docs/trace.md).",
        0,
    )
    lines += [f"name: {scalar(app_name(proposal))}", "compartments:", f"  - name: {DEFAULT}"]
    lines += [
        "    mechanism: {driver: fcalls}",
        "    default: true  # the app's own code, and every module not placed below",
    ]
    costs = {row.name: row for row in prediction.compartments} if prediction is not None else {}
    for compartment in proposal.compartments:
        lines += _comment(f"{compartment.seed}: {compartment.why[compartment.seed]}", 2)
        for unit in compartment.units[1:]:
            lines += _comment(f"{unit} joins it: {compartment.why[unit]}", 2)
        lines += _comment(_mechanism_line(compartment), 2)
        row = costs.get(compartment.name)
        if row is not None:
            others = "".join(f"; with {driver}: {slowdown:.2f}x" for driver, slowdown in row.alternatives.items())
            lines += _comment(
                f"predicted: {row.crossings} crossings carrying {_kib(row.bytes)}: +{row.added_s * 1e3:.2f} ms, "
                f"{row.slowdown:.2f}x the traced work{others}",
                2,
            )
        lines += [f"  - name: {compartment.name}", f"    mechanism: {{driver: {compartment.mechanism}}}"]
        lines += _hardening_lines(compartment)
    lines.append("libraries:" if proposal.compartments else "libraries: {}")
    for compartment in proposal.compartments:
        for unit in compartment.units:
            for entry in library_entries(unit):
                why = "where the cut is" if unit == compartment.seed else f"joins {compartment.seed}"
                if entry != unit:
                    why = f"{unit}'s C module"
                lines.append(f"  {entry}: {{compartment: {compartment.name}}}  # {why}")
    if proposal.notes:
        lines.append("# Seen, and not proposed:")
        for note in proposal.notes:
            lines += [f"#   {line[2:]}" for line in _comment(note, 0)]
    if prediction is not None:
        lines.append("#")
        lines += [f"# {line}" if line else "#" for line in cost_report(prediction).splitlines()]
    return "\n".join(lines) + "\n"


def app_name(proposal: Proposal) -> str:
    """The app's name for ``name:``: the first run's module, or its script's stem."""
    if not proposal.runs.runs:
        return "app"
    command = proposal.runs.runs[0].command
    return command[1] if command[0] == "-m" and len(command) > 1 else Path(command[0]).stem or "app"


def cost_report(prediction: Prediction) -> str:
    lines = ["Predicted cost on this machine (calibrated by flexos trace):"]
    for row in prediction.compartments:
        others = ", ".join(f"{driver} {slowdown:.2f}x" for driver, slowdown in row.alternatives.items())
        lines.append(
            f"  {row.name:<16} {row.mechanism:<10} {row.crossings:>8} crossings {_kib(row.bytes):>10}"
            f"  +{row.added_s * 1e3:8.2f} ms  {row.slowdown:5.2f}x" + (f"  (with {others})" if others else "")
        )
    lines.append(
        f"  all compartments: {prediction.slowdown:.2f}x the {prediction.work_s * 1e3:.1f} ms of CPU the runs spent "
        "between their first and last crossing (the recorder's share taken out)"
    )
    lines.append(
        f"  a whole run, start to end (flexos run's start and each compartment's included): {prediction.whole_run:.2f}x"
    )
    return "\n".join(lines)


# -- the explore space ------------------------------------------------------------------------------
def _shorts(names: list[str]) -> dict[str, str]:
    """A distinct ``Short`` per component (explore writes them into configuration names)."""
    taken: set[str] = set()
    shorts = {}
    for name in names:
        letters = [c for c in name if c.isalpha()] or ["x"]
        short = letters[0].upper()
        rest = [c.lower() for c in letters[1:]]
        while short in taken and rest:
            short += rest.pop(0)
        while short in taken:
            short += "x"
        taken.add(short)
        shorts[name] = short
    return shorts


def _common(proposal: Proposal) -> dict[str, str]:
    """Compartment hardening toggles every proposed compartment shares (explore toggles them anywhere)."""
    toggles: dict[str, str] = {}
    hardened = [c.hardening for c in proposal.compartments]
    if hardened and all(h.env == "clean" for h in hardened):
        toggles["Env"] = "{env: clean}"
    if hardened and all(h.network == "none" for h in hardened):
        toggles["Net"] = "{network: none}"
    if hardened and all(not h.seccomp_allow for h in hardened):
        toggles["Seccomp"] = "{seccomp: compute-only}"
    paths = {(tuple(g.value for g in h.read), tuple(g.value for g in h.write)) for h in hardened}
    if len(paths) == 1:
        read, write = next(iter(paths))
        listed = ", ".join
        toggles["Fs"] = (
            f"{{filesystem: {{read: [{listed(map(scalar, read))}], write: [{listed(map(scalar, write))}]}}}}"
        )
    return toggles


def space_yaml(proposal: Proposal) -> str:
    """An ``explore:`` space whose components are the proposed cuts (docs/explore.md)."""
    names = [c.name for c in proposal.compartments]
    shorts = _shorts(names)
    lines = [
        "# An explore space proposed by `flexos trace`: its components are the proposed cuts, its toggles",
        "# the hardening every proposed compartment shares. Run: flexos explore THIS_FILE --budget N",
        "compartments:",
        f"  - name: {DEFAULT}",
        "    mechanism: {driver: fcalls}",
        "    default: true",
        "explore:",
        "  components:",
    ]
    for compartment in proposal.compartments:
        modules = ", ".join(scalar(entry) for entry in compartment.entries())
        lines.append(f"    {scalar(compartment.name)}: {{short: {shorts[compartment.name]}, modules: [{modules}]}}")
    usable = [{n for n, why in c.usable.items() if why is None} for c in proposal.compartments]
    everywhere = set.intersection(*usable) if usable else set()
    drivers = sorted({"fcalls", *everywhere}, key=lambda name: driver_class(name).strength)
    lines.append(f"  compartments: {max(1, len(names))}")
    lines.append(f"  drivers: [{', '.join(drivers)}]  # those every component can use here")
    toggles = _common(proposal)
    if toggles:
        lines += ["  hardening:", "    compartment:"]
        lines += [f"      {name}: {value}" for name, value in toggles.items()]
    lines += ["  benchmark:", *(f"    {line}" for line in _benchmark(proposal))]
    return "\n".join(lines) + "\n"


_TIMER = (
    "import subprocess, sys, time; started = time.perf_counter(); "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); print(time.perf_counter() - started)"
)


def _benchmark(proposal: Proposal) -> list[str]:
    runs = proposal.runs.runs
    if not runs or any(run.data["interrupted"] for run in runs):
        return [
            "# The traced app is a server (a signal ended its run): replace this with a client that prints its",
            "# metric last, e.g. requests per second (better: higher); see docs/explore.md.",
            f"command: {scalar('echo replace this benchmark with a client that prints its metric last >&2; exit 1')}",
            "better: higher",
        ]
    run = runs[0]
    command = [Path(sys.executable).parent.joinpath("flexos").as_posix(), "run", "-c", "$FLEXOS_CONFIG", *run.command]
    words = " ".join('"$FLEXOS_CONFIG"' if word == "$FLEXOS_CONFIG" else shlex.quote(word) for word in command)
    text = f"cd {shlex.quote(run.cwd)} && {shlex.quote(sys.executable)} -c {shlex.quote(_TIMER)} {words}"
    return [
        "# the first traced command, timed (seconds: lower is better)",
        f"command: {json.dumps(text)}",
        "better: lower",
    ]
