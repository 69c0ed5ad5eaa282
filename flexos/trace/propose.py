"""From recorded runs to a proposal: which units get a compartment, with which mechanism, and the
least privilege each compartment needs — every part with what in the runs asked for it.

Where to cut: a *seed* is a unit that is native code (a C extension) or a known parser of
untrusted input — for the standard library, one of :data:`~flexos.trace.units.STDLIB_COMPONENTS`
that the app's own code calls — and that was called from another unit at least once. Each seed
gets a compartment. Then a unit that is not a seed joins the compartment it talks to most, when
it talks to it more than to everything left in the app and needs no privilege of its own (no
file outside Python's, no socket, no process, no set variable): the app's adapter around a C
parser (``kv.resp`` around ``hiredis``) goes with it, so the gate sits where calls are fewest.

Under a placement, what a unit does belongs to the compartment of the innermost *placed* unit on
its stack (the chain the recorder kept), which is where that code runs once cut: a module that is
not placed runs wherever it is called from.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from flexos.drivers import driver_class, names
from flexos.hardening import CLEAN_ENVIRONMENT, app_code, expand_events
from flexos.trace.runs import Edge, Observation, Run, Runs, UnitInfo
from flexos.trace.units import APP, KNOWN_PARSERS, MAIN, STDLIB, library_entries

if TYPE_CHECKING:
    from flexos.drivers.base import Driver

DEFAULT = "app"  # the default compartment's name in a proposal
# Audit event families a compartment is denied when the runs never saw it raise one.
DENIABLE = ("subprocess", "ctypes", "socket")
# What glibc reads to resolve a name (no audit event shows these reads).
_RESOLVER_FILES = ("/etc/hosts", "/etc/nsswitch.conf", "/etc/resolv.conf", "/etc/gai.conf", "/etc/host.conf")
_NETWORK_EVENTS = ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg")


@dataclass(frozen=True)
class Grant:
    """One permission a compartment gets, and why."""

    option: str  # filesystem.read, filesystem.write, network, env, seccomp.allow
    value: str
    why: str


@dataclass
class Hardening:
    env: str = "clean"  # clean, keep (clean but the variables in env_keep) or inherit
    network: str = "none"
    read: list[Grant] = field(default_factory=list)
    write: list[Grant] = field(default_factory=list)
    env_keep: list[Grant] = field(default_factory=list)
    seccomp_allow: list[Grant] = field(default_factory=list)
    audit_deny: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # option -> why it is what it is

    def grants(self) -> list[Grant]:
        extra = []
        if self.env == "inherit":
            extra.append(Grant("env", self.env, self.why["env"]))
        if self.network != "none":
            extra.append(Grant("network", self.network, self.why["network"]))
        return [*self.read, *self.write, *self.env_keep, *self.seccomp_allow, *extra]

    def env_value(self) -> str | dict[str, list[str]]:
        """``env:`` as flexos.yaml writes it."""
        return {"keep": [grant.value for grant in self.env_keep]} if self.env == "keep" else self.env


@dataclass
class Compartment:
    name: str
    seed: str
    units: list[str]  # the seed first, then what joined it
    why: dict[str, str]  # unit -> why it is here
    mechanism: str = ""
    usable: dict[str, str | None] = field(default_factory=dict)  # driver -> None (usable) or why not
    hardening: Hardening = field(default_factory=Hardening)
    reaches: dict[str, str] = field(default_factory=dict)  # compartment -> why this one imports from it

    def entries(self) -> list[str]:
        return [entry for unit in self.units for entry in library_entries(unit)]


@dataclass
class Proposal:
    runs: Runs
    compartments: list[Compartment]
    placement: dict[str, str]  # unit -> compartment
    notes: list[str]  # what was seen and is not proposed, and why
    directory: str | None = None  # where the flexos.yaml goes (relative paths are read from there)

    def compartment_of_chain(self, chain: Iterable[str]) -> str:
        """Where code with these units on its stack runs: the innermost placed one's compartment."""
        return _placed(chain, self.placement)

    def compartment_of_unit(self, unit: str) -> str:
        return self.placement.get(unit, DEFAULT)


# -- where to cut --------------------------------------------------------------------------------
def _weights(edges: dict[tuple[str, str], Edge]) -> dict[str, dict[str, int]]:
    """unit -> other unit -> calls between them, either way."""
    weights: dict[str, dict[str, int]] = {}
    for (caller, callee), edge in edges.items():
        if caller == callee:
            continue
        weights.setdefault(caller, {})[callee] = weights.get(caller, {}).get(callee, 0) + edge.calls
        weights.setdefault(callee, {})[caller] = weights.get(callee, {}).get(caller, 0) + edge.calls
    return weights


def _busiest_site(edges: Iterable[Edge], runs: Runs) -> str:
    """``; most: CALLEE from FILE:LINE (Nx)`` for the call site these edges saw most, if any."""
    sites = [site for edge in edges for site in edge.sites]
    if not sites:
        return ""
    site = max(sites, key=lambda s: s.count)
    where = f" from {runs.short(site.file, site.run)}:{site.line}" if site.file else ""
    return f"; most: {site.callee}{where} ({site.count}x)"


def _seed_reason(
    unit: UnitInfo, edges: dict[tuple[str, str], Edge], units: dict[str, UnitInfo], runs: Runs
) -> str | None:
    """Why ``unit`` is a seed, or None."""
    callers = [
        e
        for (caller, callee), e in edges.items()
        if callee == unit.name and caller != unit.name and (unit.kind != STDLIB or _is_app(caller, units))
    ]
    if not callers:
        return None
    calls = sum(e.calls for e in callers)
    by = ", ".join(f"{e.caller} {e.calls}x" for e in sorted(callers, key=lambda e: -e.calls)[:3])
    by += _busiest_site(callers, runs)
    importer = runs.imported_by(unit.name)
    imported = f", imported by {importer}" if importer else ""
    if unit.kind == STDLIB:
        what = f"standard-library {unit.name}" + (f" (C: {', '.join(unit.extensions)})" if unit.extensions else "")
        return f"{what}, a parser or C binding the app calls{imported}: {calls} calls ({by})"
    if unit.extensions:
        return f"C extension ({', '.join(unit.extensions[:3])}){imported}, {calls} calls from other units ({by})"
    if unit.name in KNOWN_PARSERS:
        return f"a parser of untrusted input{imported}, {calls} calls from other units ({by})"
    return None


def _is_app(unit: str, units: dict[str, UnitInfo]) -> bool:
    info = units.get(unit)
    return unit == MAIN or (info is not None and info.kind == APP)


def _needs_privilege(unit: str, target: str, placement: dict[str, str], runs: Runs) -> str | None:
    """What ``target`` would have to be granted if ``unit`` joined it: what runs there then and did not before."""
    trial = {**placement, unit: target}
    for kind in ("files", "sockets", "processes", "env"):
        for obs in runs.observations(kind):
            if _placed(obs.chain, trial) != target or _placed(obs.chain, placement) == target:
                continue
            reason = _privilege_of(obs, runs)
            if reason is not None:
                doer = obs.chain[0] if obs.chain else MAIN
                return f"{reason} ({doer} at {_short_site(obs.site, obs.run, runs)})"
    return None


def _placed(chain: Iterable[str], placement: dict[str, str]) -> str:
    for unit in chain:
        where = placement.get(unit)
        if where is not None:
            return where
    return DEFAULT


def _privilege_of(obs: Observation, runs: Runs) -> str | None:
    """What ``obs`` needs granted, said as what the compartment would do (None: nothing to grant)."""
    if obs.kind == "files":
        access, path = obs.key[0], obs.key[1]
        if access in ("read", "list") and _free_read(path, access, runs.runs[obs.run]):
            return None
        verb = "open the database" if access == "database" else access
        return f"{verb} {runs.short(path, obs.run)}"
    if obs.kind == "env":
        name, present = obs.key
        return f"read ${name}" if present and name not in CLEAN_ENVIRONMENT else None
    if obs.kind == "sockets":
        event, _, address = obs.key
        return "open sockets" if event == "socket.__new__" else f"{event.partition('.')[2]} {address}"
    return f"spawn {obs.key[1]}"


def _always_readable(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


_CODE_SUFFIXES = tuple(importlib.machinery.all_suffixes())


def _free_read(path: str, access: str, run: Run) -> bool:
    """Read or listed without a grant: Python's own paths and the system's libraries, and the
    app's own code as the import system reads it (its directories listed, its module files
    read), which hardening opens to a compartment for the modules placed in it and those they
    import (flexos.hardening.placed_code). The app's other files (.env, data) need a grant."""
    if _always_readable(path, run.always_readable):
        return True
    if not _always_readable(path, app_code(run.sys_path)):
        return False
    return os.path.isdir(path) if access == "list" else path.endswith(_CODE_SUFFIXES)


def place(runs: Runs) -> tuple[list[Compartment], dict[str, str], list[str]]:
    """Compartments (seeds, and what joins them), the unit placement, and notes on what was left."""
    units, edges = runs.units(), runs.edges()
    notes: list[str] = []
    compartments: list[Compartment] = []
    placement: dict[str, str] = {}
    taken = {DEFAULT}
    for info in sorted(units.values(), key=lambda u: u.name):
        if info.name == MAIN or info.kind == APP:
            continue
        reason = _seed_reason(info, edges, units, runs)
        if reason is None:
            if info.extensions and info.kind != STDLIB:
                importer = runs.imported_by(info.name)
                by = f" by {importer}" if importer else ""
                notes.append(f"{info.name}: C extension imported{by}, never called by another unit: not proposed")
            continue
        name = _compartment_name(info.name, taken)
        compartments.append(Compartment(name, info.name, [info.name], {info.name: reason}))
        placement[info.name] = name
    weights = _weights(edges)
    packages = {u for u in units if any(other.startswith(u + ".") for other in units)}
    scripts = _scripts(runs)
    changed = True
    while changed:
        changed = False
        for unit in sorted(weights, key=lambda u: -max(weights[u].values(), default=0)):
            if unit in placement or unit in packages or unit in scripts or not _may_join(unit, units):
                continue
            towards: dict[str, int] = {}
            for other, calls in weights[unit].items():
                where = placement.get(other, DEFAULT)
                towards[where] = towards.get(where, 0) + calls
            staying = towards.pop(DEFAULT, 0)
            if not towards:
                continue
            best = max(towards, key=lambda c: towards[c])
            if towards[best] <= staying:
                continue
            needs = _needs_privilege(unit, best, placement, runs)
            if needs is not None:
                notes.append(
                    f"{unit}: talks most to compartment {best!r} ({towards[best]} calls, {staying} with the app) but "
                    f"with it there, {best!r} would {needs}: left in the app, so that {best!r} is not granted that"
                )
                continue
            compartment = next(c for c in compartments if c.name == best)
            compartment.units.append(unit)
            inside = [edges[k] for k in edges if unit in k and (set(k) - {unit}) & set(compartment.units)]
            compartment.why[unit] = (
                f"{towards[best]} calls with {', '.join(u for u in compartment.units if u != unit)}"
                f"{_busiest_site(inside, runs)}, {staying} with the rest of the app: the gate goes where calls are"
                " fewer"
            )
            placement[unit] = best
            changed = True
    return compartments, placement, list(dict.fromkeys(notes))


def _scripts(runs: Runs) -> set[str]:
    """The app's scripts by their module names (``notes`` for ``notes.py``, ``kv`` for ``-m kv``):
    a run of the app's tests imports its script as a module, which is still the app's script."""
    found = set()
    for run in runs.runs:
        command = run.command
        if command and command[0] == "-m":
            if len(command) > 1:
                found.add(".".join(command[1].split(".")[:2]))
        elif command and command[0].endswith(".py"):
            found.add(Path(command[0]).stem)
    return found


def _may_join(unit: str, units: dict[str, UnitInfo]) -> bool:
    """Whether ``unit`` may join a compartment: not the app's script, not the standard library (a
    module left unplaced is a copy in each compartment that uses it), not a test module (a test
    runner imports and inspects those itself)."""
    info = units.get(unit)
    if unit == MAIN or info is None or info.kind == STDLIB:
        return False
    last = unit.rpartition(".")[2]
    return not (last.startswith("test_") or last.endswith("_test") or last == "conftest")


def _compartment_name(unit: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c in "_-" else "-" for c in unit).strip("-") or "lib"
    if not (base[0].isalpha() or base[0] == "_"):
        base = f"c-{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


# -- least privilege -----------------------------------------------------------------------------
def _attributed(proposal: Proposal, compartment: str, kind: str) -> list[Observation]:
    return [o for o in proposal.runs.observations(kind) if proposal.compartment_of_chain(o.chain) == compartment]


def _why(obs: Observation, runs: Runs, what: str) -> str:
    site = _short_site(obs.site, obs.run, runs)
    unit = obs.chain[0] if obs.chain else MAIN
    return f"{unit} at {site} ({obs.count}x): {what}"


def _short_site(site: str | None, run: int, runs: Runs) -> str:
    if site is None:
        return "?"
    path, _, line = site.rpartition(":")
    return f"{runs.short(path, run)}:{line}"


def _display_path(path: str, proposal: Proposal, run: int) -> str:
    """A path as flexos.yaml writes it: relative to the yaml's directory (where flexos reads a
    relative path from; the run's, when the yaml's is not known) when beneath it."""
    base = (proposal.directory or proposal.runs.runs[run].cwd).rstrip("/")
    if path == base:
        return "."
    if path.startswith(base + "/"):
        return "./" + path[len(base) + 1 :]
    return path


def _beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def harden(proposal: Proposal, compartment: Compartment) -> Hardening:
    runs = proposal.runs
    hardening = Hardening()
    reads: dict[str, tuple[str, int]] = {}  # path -> (why, the run that saw it)
    writes: dict[str, tuple[str, int]] = {}
    for obs in _attributed(proposal, compartment.name, "files"):
        access, path, via = obs.key
        shown = runs.short(path, obs.run)
        if access in ("read", "list"):
            if not _free_read(path, access, runs.runs[obs.run]):
                verb = "listed" if access == "list" else "read"
                reads.setdefault(path, (_why(obs, runs, f"{verb} {shown}"), obs.run))
        elif access == "write":
            writes.setdefault(path, (_why(obs, runs, f"wrote {shown}"), obs.run))
        elif access == "database":
            why = _why(obs, runs, f"{via}({shown!r}), the database and the journal beside it")
            writes.setdefault(os.path.dirname(path), (why, obs.run))
        else:  # create, remove: Landlock grants these on the directory
            verb = {"create": "created", "remove": "removed"}[access]
            writes.setdefault(os.path.dirname(path), (_why(obs, runs, f"{verb} {shown} ({via})"), obs.run))
    sockets = _attributed(proposal, compartment.name, "sockets")
    allow: dict[str, str] = {}
    for obs in sockets:
        event, family, address = obs.key
        if event == "socket.__new__":
            allow.setdefault("socket", _why(obs, runs, f"opened a {family} socket"))
        elif event == "socket.connect":
            allow.setdefault("connect", _why(obs, runs, f"connected to {address}"))
        elif event == "socket.bind":
            why = _why(obs, runs, f"bound {address}")
            allow.setdefault("bind", why)
            for call in ("listen", "accept4"):  # no audit event shows these: a bound socket serves
                allow.setdefault(call, why + "; inferred: a bound socket listens and accepts (Python's accept4)")
        elif family == "name" and not _numeric(address):  # glibc resolves a numeric address itself
            for resolver in _RESOLVER_FILES:
                if os.path.exists(resolver):
                    reads.setdefault(
                        resolver, (_why(obs, runs, f"resolved {address} (glibc reads {resolver})"), obs.run)
                    )
        if event in _NETWORK_EVENTS and family in ("AF_INET", "AF_INET6"):
            hardening.network = "allow"
            hardening.why.setdefault("network", _why(obs, runs, f"{event.partition('.')[2]} {address}"))
    for obs in _attributed(proposal, compartment.name, "processes"):
        event, program, argv = obs.key
        why = _why(obs, runs, f"{event}: {argv or program}")
        if event not in ("os.fork", "os.forkpty"):  # every spawn but a bare fork executes a program
            allow.setdefault("execve", why)
        if event == "subprocess.Popen":  # its child starts with vfork; glibc's fork and posix_spawn use clone
            allow.setdefault("vfork", why)
        if program:
            found = program if os.path.isabs(program) else _which(program, runs.runs[obs.run].cwd)
            if found and not _always_readable(found, runs.runs[obs.run].always_readable):
                reads.setdefault(found, (why + " (its program)", obs.run))
    read_set: dict[str, Observation] = {}  # variable -> the first read of it while it was set
    for obs in _attributed(proposal, compartment.name, "env"):
        if obs.key[1] and obs.key[0] not in CLEAN_ENVIRONMENT:
            read_set.setdefault(obs.key[0], obs)
    if "*" in read_set:  # it iterated the environment: which of its variables it used is not known
        hardening.env = "inherit"
        hardening.why["env"] = _why(read_set["*"], runs, "iterated os.environ (every variable)")
    elif read_set:
        hardening.env = "keep"
        hardening.env_keep = [
            Grant("env.keep", name, _why(obs, runs, f"read ${name}")) for name, obs in sorted(read_set.items())
        ]
        hardening.why["env"] = "a clean environment but the variables it read while they were set"
    else:
        hardening.why["env"] = (
            "read no variable that is set, other than PATH and LANG (env: clean sets those: /usr/bin:/bin, C.UTF-8)"
        )
    hardening.why.setdefault(
        "network", "connected, bound or sent to no address" if not sockets else "sockets, but no address"
    )
    write_paths = _minimal(_temporary_generalised(writes, runs))
    read_paths = {p: w for p, w in _minimal(reads).items() if not any(_beneath(p, q) for q in write_paths)}
    hardening.write = [
        Grant("filesystem.write", _display_path(p, proposal, r), w) for p, (w, r) in sorted(write_paths.items())
    ]
    hardening.read = [
        Grant("filesystem.read", _display_path(p, proposal, r), w) for p, (w, r) in sorted(read_paths.items())
    ]
    hardening.seccomp_allow = [Grant("seccomp.allow", call, why) for call, why in sorted(allow.items())]
    events = [o for o in _attributed(proposal, compartment.name, "events")]
    for family in DENIABLE:
        exact, prefixes = expand_events([family])
        raised = [o for o in events if o.key[0] in exact or o.key[0].startswith(prefixes)]
        if raised:
            hardening.why[f"audit.{family}"] = _why(raised[0], runs, f"raised {raised[0].key[0]}")
        else:
            hardening.audit_deny.append(family)
    return hardening


def _temporary_generalised(paths: dict[str, tuple[str, int]], runs: Runs) -> dict[str, tuple[str, int]]:
    """A path in the system's temporary directory (outside the run's own directory) changes from
    run to run (``mkdtemp``, pytest's ``tmp_path``), and Landlock grants only paths that exist when
    the compartment starts: such a grant is the temporary directory itself."""
    temporary = tempfile.gettempdir()
    found: dict[str, tuple[str, int]] = {}
    for path, (why, run) in paths.items():
        if path != temporary and _beneath(path, temporary) and not _beneath(path, runs.runs[run].cwd):
            why = f"{why}; a temporary path (it changes from run to run): the temporary directory {temporary}"
            path = temporary
        found.setdefault(path, (why, run))
    return found


def _numeric(host: str) -> bool:
    """Whether ``host`` is an IP address written out (no name to resolve)."""
    import ipaddress

    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _minimal(paths: dict[str, tuple[str, int]]) -> dict[str, tuple[str, int]]:
    """Drop every path beneath another one of the set."""
    return {p: w for p, w in paths.items() if not any(q != p and _beneath(p, q) for q in paths)}


def _which(program: str, cwd: str) -> str | None:
    import shutil

    if "/" in program:
        return os.path.normpath(os.path.join(cwd, program))
    return shutil.which(program)


# -- mechanisms ----------------------------------------------------------------------------------
_SUBINTERPRETER_PROBE = """
import json, sys
from flexos import _subinterp
answers = {}
for name, modules in json.loads(sys.argv[1]).items():
    interp = _subinterp.create()
    source = f"import sys\\nsys.path[:] = {sys.path!r}\\n" + "".join(f"import {m}\\n" for m in modules)
    try:
        _subinterp.run(interp, source)
        answers[name] = None
    except RuntimeError as exc:
        answers[name] = str(exc).splitlines()[-1]
    finally:
        _subinterp.destroy(interp)
print(json.dumps(answers))
"""


def _in_own_interpreter(driver: type[Driver]) -> bool:
    """A mechanism that imports the compartment's modules in another interpreter of the app's process."""
    return driver.in_app_process and not driver.may_be_default


def mechanisms(compartments: list[Compartment], sys_path: list[str]) -> None:
    """Fill in which drivers each compartment can use here, and choose one: the strongest boundary
    that can be hardened, else the strongest that loads the modules."""
    drivers = [driver_class(n) for n in names()]
    drivers = [d for d in drivers if d.implemented and not d.may_be_default]
    refused = {d.name: d.unavailable() for d in drivers}
    loads: dict[str, str | None] = {}
    if any(_in_own_interpreter(d) and refused[d.name] is None for d in drivers) and compartments:
        loads = _probe_subinterpreters({c.name: c.entries() for c in compartments}, sys_path)
    for compartment in compartments:
        for driver in sorted(drivers, key=lambda d: -d.strength):
            reason = refused[driver.name]
            if reason is None and _in_own_interpreter(driver):
                reason = loads.get(compartment.name)
            compartment.usable[driver.name] = reason
        usable = [d for d in drivers if compartment.usable[d.name] is None]
        hardenable = [d for d in usable if d.hardenable]
        chosen = max(hardenable or usable, key=lambda d: d.strength, default=None)
        compartment.mechanism = chosen.name if chosen is not None else names()[0]


def _probe_subinterpreters(groups: dict[str, list[str]], sys_path: list[str]) -> dict[str, str | None]:
    """Import each group of modules in a fresh subinterpreter, in a child process (a crash there is
    the child's): None where they load, else the error."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys_path if p))
    done = subprocess.run(
        [sys.executable, "-c", _SUBINTERPRETER_PROBE, json.dumps(groups)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return dict.fromkeys(groups, f"the subinterpreter probe failed: {why}")
    return json.loads(done.stdout.splitlines()[-1])


# -- all of it ------------------------------------------------------------------------------------
def reaches(proposal: Proposal, compartment: Compartment) -> dict[str, str]:
    """The other compartments whose modules ``compartment`` imports (a hardened compartment
    reaches only those it lists): those its units' modules name, and those whose modules were
    imported with code of it on the stack."""
    found: dict[str, str] = {}
    uses = proposal.runs.uses()
    for unit in compartment.units:
        for other, module in sorted(uses.get(unit, {}).items()):
            target = proposal.compartment_of_unit(other)
            if target not in (compartment.name, DEFAULT):
                found.setdefault(target, f"{module} names {other}")
    for run in proposal.runs.runs:
        for module, seen in run.data["imports"].items():
            if proposal.compartment_of_chain(seen["chain"]) != compartment.name:
                continue
            target = next((c.name for c in proposal.compartments if module in c.entries()), DEFAULT)
            if target not in (compartment.name, DEFAULT):
                found.setdefault(target, f"{seen['chain'][0]} imported {module}")
    return dict(sorted(found.items()))


def propose(runs: Runs, directory: str | None = None) -> Proposal:
    """The proposal from ``runs``, its paths written for a flexos.yaml in ``directory``."""
    compartments, placement, notes = place(runs)
    proposal = Proposal(runs, compartments, placement, notes, directory)
    for compartment in compartments:
        compartment.hardening = harden(proposal, compartment)
        compartment.reaches = reaches(proposal, compartment)
    sys_path = list(runs.runs[-1].sys_path) if runs.runs else []
    mechanisms(compartments, sys_path)
    return proposal
