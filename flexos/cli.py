"""The ``flexos`` command: ``check`` an image, ``run`` an unmodified app under it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from flexos.errors import ConfigError, DriverUnavailable, FlexosError
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image

_config_option = click.option(
    "-c", "--config", default=DEFAULT_CONFIG, show_default=True, metavar="FILE", help="The image's flexos.yaml."
)
_run_config_option = click.option(
    "-c",
    "--config",
    metavar="FILE",
    help="The image's flexos.yaml (default: ./flexos.yaml, else the one beside SCRIPT).",
)


@click.group()
@click.version_option(package_name="flexos")
def main() -> None:
    """FlexOS-style flexible isolation for Python applications."""


@main.command()
@click.argument("file", required=False, metavar="[FILE]")
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Print the same report as JSON data.")
def check(file: str | None, config: str, as_json: bool) -> None:
    """Validate FILE (default: -c, else flexos.yaml), print the image (compartments, drivers, who is
    where), each compartment's effective policy and this machine's features."""
    from flexos.config import app_path, parse

    config = file or config
    search = app_path(config)
    try:
        image, notes = parse(config, search)
    except ConfigError as exc:
        _fail(exc.problems)
    _echo_err(notes)
    report = _check_report(image, search)
    _echo_err(report["will_fail"])
    if as_json:
        import json

        click.echo(json.dumps({**report, "warnings": notes}, indent=2))
    else:
        _echo_check_report(image, report)
    if report["refused"]:
        _fail(report["refused"])


def _check_report(image: Image, search: list[str]) -> dict[str, Any]:
    """Everything ``flexos check`` says about ``image`` on this machine, as plain data."""
    from flexos.drivers import driver_class
    from flexos.hardening import effective_policy, needed_features
    from flexos.probe import machine_report

    features = {feature.name: feature for feature in machine_report()}
    refused = []
    will_fail: list[str] = []  # works, but an import will fail: said now, as a warning
    compartments = []
    for spec in image.compartments.values():
        driver = driver_class(spec.driver)
        options = driver.read_options(spec.options)
        reason = driver.unavailable(options)
        if reason:
            refused.append(f"{image.source}: compartment {spec.name!r}: {reason}")
        for option, feature in needed_features(spec.hardening):
            if not features[feature].available:
                refused.append(
                    f"{image.source}: compartment {spec.name!r}: hardening {option} needs {feature}, which this "
                    f"machine lacks ({features[feature].detail}); remove the option or run on a machine that has it"
                )
        placed = [module for module, owner in image.libraries.items() if owner == spec.name]
        elsewhere = [module for module, owner in image.libraries.items() if owner != spec.name]
        will_fail += _extensions_refused(image, spec.name, driver, placed, search)
        isolated = not spec.default and not driver.direct
        compartments.append(
            {
                "name": spec.name,
                "driver": spec.driver,
                "unavailable": reason,
                "default": spec.default,
                "options": spec.options,
                "described": driver.describe(options),
                # e.g. a library that falls back from its C extension in a subinterpreter
                "predicted": driver.predict(sorted(placed)) if reason is None else [],
                "restart": spec.restart,
                "timeout": spec.timeout,
                "max_reply": spec.max_reply if isolated else None,
                "buffers": image.buffer_sharing(spec.name) if isolated else None,
                "hardening": spec.hardening,
                "effective": effective_policy(spec.hardening, search, placed, elsewhere) if driver.hardenable else None,
                "reaches": None if spec.default else _reached(image, spec),
            }
        )
    return {
        "image": image.source,
        "compartments": compartments,
        "libraries": dict(sorted(image.libraries.items())),
        "machine": [{"name": f.name, "available": f.available, "detail": f.detail} for f in features.values()],
        "refused": refused,
        "will_fail": will_fail,
    }


def _extensions_refused(image: Image, name: str, driver: Any, placed: list[str], search: list[str]) -> list[str]:
    """Why a C extension placed in compartment ``name`` will not load there (its driver says): its
    import fails then, loudly; said at check, to place it elsewhere first."""
    from flexos.hardening import extension_modules

    found = {}
    owner_of = {}
    for module in placed:
        for extension, path in extension_modules(module, search).items():
            found[extension] = path
            owner_of[extension] = module
    refused: dict[str, dict[str, str]] = {}
    for extension, why in sorted(driver.refuses(found).items()):
        refused.setdefault(owner_of[extension], {})[extension] = why
    return [
        f"{image.source}: warning: compartment {name!r} ({driver.name}) cannot load the C extension"
        f"{'s' if len(whys) > 1 else ''} {', '.join(map(repr, whys))} of library {module!r} "
        f"({next(iter(whys.values()))}); place {module!r} in a compartment with a process of its own"
        for module, whys in refused.items()
    ]


def _echo_check_report(image: Image, report: dict[str, Any]) -> None:
    click.echo(f"image {image.source}")
    click.echo("compartments:")
    for entry in report["compartments"]:
        listed = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
        role = "default (the app's own code)" if entry["default"] else f"restart: {entry['restart']}"
        status = "ok" if entry["unavailable"] is None else "UNAVAILABLE"
        click.echo(
            f"  {entry['name']:<14} {entry['driver']:<10} {status:<12} {role}" + (f"  [{listed}]" if listed else "")
        )
        if entry["hardening"]:
            click.echo(f"  {'':<14} hardening: {_describe_hardening(entry['hardening'])}")
        if entry["described"]:  # e.g. which accelerator QEMU will use here, and why
            click.echo(f"  {'':<14} {entry['driver']}: {entry['described']}")
        for note in entry["predicted"]:
            click.echo(f"  {'':<14} {entry['driver']}: {note}")
    click.echo("reach (whose modules each compartment may import; the default one reaches all):")
    for spec in image.compartments.values():
        if not spec.default:
            click.echo(f"  {spec.name:<14} -> {_describe_reach(image, spec)}")
    click.echo("libraries:")
    for module, owner in report["libraries"].items():
        click.echo(f"  {module:<30} -> {owner}")
    click.echo("  (modules not listed are imported locally by each compartment that uses them)")
    click.echo("effective policy (what each compartment is held to once started, flexos's additions included):")
    for entry in report["compartments"]:
        for line in _describe_effective(entry):
            click.echo(line)
    click.echo("this machine:")
    for feature in report["machine"]:
        status = "available" if feature["available"] else "unavailable"
        click.echo(f"  {feature['name']:<14} {status:<12} {feature['detail']}")


def _describe_effective(entry: dict[str, Any]) -> list[str]:
    """The lines of one compartment's effective policy (:func:`flexos.hardening.effective_policy`)."""
    from flexos.config import human_size

    name = entry["name"]
    if entry["default"]:
        return [f"  {name:<14} the app itself: unconfined, reaches every compartment"]
    effective = entry["effective"]
    timeout = f"{entry['timeout']:g}s per call, then the compartment is ended" if entry["timeout"] else "none"
    lines = [
        f"  {name:<14} restart {entry['restart']}; call timeout {timeout}"
        + (f"; replies up to {human_size(entry['max_reply'])}" if entry["max_reply"] else "")
        + (
            "; large buffers cross as read-only views (sharing: buffers: view)"
            if entry.get("buffers") == "view"
            else ""
        ),
        f"  {'':<14} reaches  {', '.join(entry['reaches']) or 'nothing'}",
    ]
    if effective is None:
        return [*lines, f"  {'':<14} runs in the app's process: the app's own files, network and privileges"]
    pad = f"  {'':<14} "
    if effective["read"] is None:
        lines.append(f"{pad}read     everything the app's user can read (no hardening.filesystem)")
        lines.append(f"{pad}write    everything the app's user can write (no hardening.filesystem)")
    else:
        grouped: dict[str, list[str]] = {}
        for item in effective["read"]:
            grouped.setdefault(item["why"], []).append(item["path"])
        for position, (why, paths) in enumerate(grouped.items()):
            lines.append(f"{pad}{'read' if position == 0 else '':<8} {', '.join(paths)}  ({why})")
        written = [item["path"] for item in effective["write"]]
        lines.append(
            f"{pad}write    {', '.join(written) or 'nothing'}" + ("  (hardening.filesystem.write)" if written else "")
        )
    denied = effective["seccomp_deny"]
    unless = "".join(f"; {rule['call']} unless {rule['meaning']}" for rule in effective["seccomp_deny_unless"])
    lines.append(f"{pad}seccomp  " + (f"EPERM for {', '.join(denied)}{unless}" if denied else "no filter"))
    audit = effective["audit_deny"]
    lines.append(f"{pad}audit    " + (f"denies {', '.join(audit)} (and their .sub-events)" if audit else "no policy"))
    network = "none (a network namespace of its own: only lo, down)" if effective["network"] == "none" else "the app's"
    lines.append(f"{pad}network  {network}")
    env = effective["env"]
    lines.append(f"{pad}env      " + (f"clean: only {', '.join(env)}" if env != "inherit" else "the app's, inherited"))
    limits = effective["limits"]
    if limits:
        shown = [f"{key} {human_size(value) if key == 'memory' else value}" for key, value in limits.items()]
        lines.append(f"{pad}limits   {', '.join(shown)}")
    return lines


def _reached(image: Image, spec: CompartmentSpec) -> list[str]:
    return [name for name in image.compartments if name != spec.name and image.may_reach(spec.name, name)]


def _describe_reach(image: Image, spec: CompartmentSpec) -> str:
    listed = ", ".join(_reached(image, spec)) or "nothing"
    if spec.reaches is not None:
        return listed
    why = "hardened, so only what reaches: lists" if spec.hardening else "unhardened, so every compartment"
    return f"{listed}  (reaches: not declared; {why})"


def _describe_hardening(hardening: dict) -> str:
    parts = []
    if hardening.get("env") == "clean":
        parts.append("env clean")
    elif isinstance(hardening.get("env"), dict):
        parts.append(f"env clean but {', '.join(hardening['env']['keep'])}")
    if hardening.get("network") == "none":
        parts.append("no network")
    if hardening.get("filesystem") is not None:
        fs = hardening["filesystem"]
        parts.append(f"filesystem read {', '.join(fs['read']) or '-'} write {', '.join(fs['write']) or '-'}")
    if hardening.get("seccomp") is not None:
        parts.append(f"seccomp {hardening['seccomp'].get('profile') or 'custom'}")
    limits = {k: v for k, v in (hardening.get("limits") or {}).items() if v is not None}
    if limits:
        from flexos.config import human_size

        parts.append("limits " + ", ".join(f"{k}={human_size(v) if k == 'memory' else v}" for k, v in limits.items()))
    deny = (hardening.get("audit") or {}).get("deny")
    if deny:
        parts.append(f"audit deny {', '.join(deny)}")
    return "; ".join(parts) or "none"


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_run_config_option
@click.option("-m", "module", metavar="MODULE", help="Run a module, as python -m does.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Log gated imports, compartment starts, restarts and denials to stderr."
)
@click.option(
    "--stats",
    is_flag=True,
    help="At exit, print to stderr what the gates carried: per compartment calls, time, bytes, proxies, restarts.",
)
@click.option(
    "--stats-json",
    metavar="FILE",
    type=click.Path(dir_okay=False, writable=True),
    help="At exit, write the gate statistics to FILE as JSON (schema in docs/config.md).",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(
    config: str | None, module: str | None, verbose: bool, stats: bool, stats_json: str | None, args: tuple[str, ...]
) -> None:
    """Run an unmodified app (SCRIPT [ARGS]... or -m MODULE [ARGS]...) under the image
    (FLEXOS_VERBOSE=1 in the environment logs as -v does, for apps started otherwise)."""
    from flexos.config import app_path, load

    if module is None and not args:
        raise click.UsageError("give a script to run, or -m MODULE")
    if verbose:
        os.environ["FLEXOS_VERBOSE"] = "1"  # compartments inherit it
    if module is None and not Path(args[0]).is_file():
        # as python does: one line, exit 2
        click.echo(
            f"flexos run: can't open file {str(Path(args[0]).absolute())!r}: [Errno 2] No such file or directory",
            err=True,
        )
        sys.exit(2)
    app_dir = Path.cwd() if module is not None else Path(args[0]).resolve().parent
    if config is None:
        beside = app_dir / DEFAULT_CONFIG
        config = DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() or not beside.is_file() else str(beside)
    try:
        image = load(config, app_path(config, app_dir))
    except ConfigError as exc:
        _fail(exc.problems)
    from flexos.runtime.child import exec_app

    json_file = None if stats_json is None else os.path.abspath(stats_json)  # the app may chdir
    exec_app(image, module, list(args), stats, json_file)  # does not return: the app runs in a lean interpreter


@main.command()
@click.argument("space", type=click.Path(dir_okay=False))
@click.option("--budget", type=float, help="The performance the configurations must meet (the benchmark's metric).")
@click.option("--order", "order_file", metavar="FILE", help="An explicit safety order (Graphviz digraph).")
@click.option("--out", metavar="DIR", help="Where results go (default: SPACE's directory, STEM.explore).")
@click.option("--exhaustive", is_flag=True, help="Measure every configuration instead of inferring.")
@click.option("--list", "list_only", is_flag=True, help="Print the space's configurations; run nothing.")
@click.option("--engine", metavar="local|ray", help="Where runs happen (default: the space's engine, else local).")
@click.option("--address", metavar="ADDR", help="The Ray cluster (ray's --address; none: a Ray of its own here).")
def explore(
    space: str,
    budget: float | None,
    order_file: str | None,
    out: str | None,
    exhaustive: bool,
    list_only: bool,
    engine: str | None,
    address: str | None,
) -> None:
    """Find the safest configurations of SPACE whose benchmark meets --budget (docs/explore.md)."""
    try:
        from flexos.explore import BenchmarkFailed, default_out, listing, load_space, report, resume_hint
        from flexos.explore import explore as run_exploration
    except ModuleNotFoundError as exc:  # numpy, networkx ... are the `explore` extra, not the core
        if (exc.name or "flexos").partition(".")[0] == "flexos":
            raise
        raise click.ClickException(
            f"flexos explore needs {exc.name!r}, which this install lacks: pip install 'flexos[explore]'"
        ) from None

    if list_only:
        try:
            found, notes = load_space(space)
        except ConfigError as exc:
            _fail(exc.problems)
        _echo_err(notes)
        for line in listing(found):
            click.echo(line)
        return
    if budget is None:
        raise click.UsageError("give --budget (or --list to see the configurations)")
    from flexos.explore.engines import ENGINES

    if engine is not None and engine not in ENGINES:
        raise click.UsageError(f"unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    target = Path(out) if out is not None else default_out(Path(space))
    try:
        done = run_exploration(space, budget, order_file, out, exhaustive, engine, address)
    except ConfigError as exc:
        _fail(exc.problems)
    except DriverUnavailable as exc:
        _fail(str(exc).splitlines())
    except BenchmarkFailed as exc:
        click.echo(f"\nflexos explore: {exc}", err=True)
        click.echo(resume_hint(target), err=True)
        sys.exit(1)
    except FlexosError as exc:  # the engine cannot run the space (no hosts, a feature no host has)
        click.echo(f"flexos explore: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(f"\nflexos explore: interrupted. {resume_hint(target)}", err=True)
        sys.exit(130)
    _echo_err(done.notes)
    click.echo(report.table(done.space, done.configs, done.order, done.goal, done.answer, done.execution))
    click.echo(f"benchmark runs: {done.runs} now, the rest from {done.out / 'cache.jsonl'}")
    click.echo("wrote: " + ", ".join(str(f) for f in done.files))


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("-o", "--output", default=DEFAULT_CONFIG, show_default=True, metavar="FILE", help="The proposal.")
@click.option("--runs", "runs_path", metavar="FILE", help="Where runs are kept (default: OUTPUT's STEM.trace.json).")
@click.option("--fresh", is_flag=True, help="Forget the runs recorded before this one.")
@click.option("--write", is_flag=True, help="Replace an existing OUTPUT with the proposal (its changes are printed).")
@click.option("--space", metavar="FILE", help="Also write an explore space whose components are the proposed cuts.")
@click.option("--recalibrate", is_flag=True, help="Measure this machine's gate costs again.")
@click.option("-m", "module", metavar="MODULE", help="Trace a module, as python -m does.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def trace(
    output: str,
    runs_path: str | None,
    fresh: bool,
    write: bool,
    space: str | None,
    recalibrate: bool,
    module: str | None,
    command: tuple[str, ...],
) -> None:
    """Learn from a run of the app (-- SCRIPT [ARGS]... or -- -m MODULE [ARGS]...) and propose a
    flexos.yaml: where to cut, each compartment's least privilege, the predicted cost (docs/trace.md)."""
    from flexos.trace.session import trace as run_trace

    learned = (["-m", module] if module is not None else []) + list(command)
    try:
        outcome = run_trace(
            Path(output),
            learned or None,
            Path(runs_path) if runs_path else None,
            fresh,
            write,
            Path(space) if space else None,
            recalibrate,
        )
    except FlexosError as exc:
        raise click.ClickException(str(exc)) from None
    _echo_err(["", *outcome.report])
    if outcome.status not in (None, 0, 130):
        click.echo(f"flexos trace: the traced app exited with status {outcome.status}; its run is recorded", err=True)
        sys.exit(outcome.status)


def _echo_err(lines: list[str]) -> None:
    for line in lines:
        click.echo(line, err=True)


def _fail(problems: list[str]) -> NoReturn:
    """Print the problems (each names its file and line) and exit 2, as for a usage error."""
    _echo_err(problems)
    sys.exit(2)
