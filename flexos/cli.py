"""The ``flexos`` command: ``check`` an image, ``run`` an unmodified app under it."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import NoReturn

import click

from flexos.errors import ConfigError, DriverUnavailable, FlexosError
from flexos.image import DEFAULT_CONFIG, CompartmentSpec, Image

_config_option = click.option(
    "-c", "--config", default=DEFAULT_CONFIG, show_default=True, metavar="FILE", help="The image's flexos.yaml."
)


@click.group()
@click.version_option(package_name="flexos")
def main() -> None:
    """FlexOS-style flexible isolation for Python applications."""


@main.command()
@_config_option
def check(config: str) -> None:
    """Validate FILE, print the image (compartments, drivers, who is where) and this machine's features."""
    from flexos.config import parse
    from flexos.drivers import driver_class
    from flexos.hardening import needed_features

    try:
        image, notes = parse(config)
    except ConfigError as exc:
        _fail(exc.problems)
    _echo_err(notes)
    refused = []
    click.echo(f"image {image.source}")
    click.echo("compartments:")
    for spec in image.compartments.values():
        driver = driver_class(spec.driver)
        options = driver.read_options(spec.options)
        listed = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        role = "default (the app's own code)" if spec.default else f"restart: {spec.restart}"
        reason = driver.unavailable(options)
        status = "ok" if reason is None else "UNAVAILABLE"
        click.echo(f"  {spec.name:<14} {spec.driver:<10} {status:<12} {role}" + (f"  [{listed}]" if listed else ""))
        if reason:
            refused.append(f"{image.source}: compartment {spec.name!r}: {reason}")
        if spec.hardening:
            click.echo(f"  {'':<14} hardening: {_describe_hardening(spec.hardening)}")
        described = driver.describe(options)  # e.g. which accelerator QEMU will use here, and why
        if described:
            click.echo(f"  {'':<14} {spec.driver}: {described}")
        if reason is None:  # e.g. a library that falls back from its C extension in a subinterpreter
            for note in driver.predict(sorted(m for m, owner in image.libraries.items() if owner == spec.name)):
                click.echo(f"  {'':<14} {spec.driver}: {note}")
    click.echo("reach (whose modules each compartment may import; the default one reaches all):")
    for spec in image.compartments.values():
        if not spec.default:
            click.echo(f"  {spec.name:<14} -> {_describe_reach(image, spec)}")
    click.echo("libraries:")
    for module, owner in sorted(image.libraries.items()):
        click.echo(f"  {module:<30} -> {owner}")
    click.echo("  (modules not listed are imported locally by each compartment that uses them)")
    features = _echo_machine_report()
    for spec in image.compartments.values():
        for option, feature in needed_features(spec.hardening):
            if not features[feature].available:
                refused.append(
                    f"{image.source}: compartment {spec.name!r}: hardening {option} needs {feature}, which this "
                    f"machine lacks ({features[feature].detail}); remove the option or run on a machine that has it"
                )
    if refused:
        _fail(refused)


def _echo_machine_report() -> dict:
    """What this kernel and CPU offer for isolation and hardening, probed now (never assumed)."""
    from flexos.probe import machine_report

    click.echo("this machine:")
    features = {}
    for feature in machine_report():
        status = "available" if feature.available else "unavailable"
        click.echo(f"  {feature.name:<14} {status:<12} {feature.detail}")
        features[feature.name] = feature
    return features


def _describe_reach(image: Image, spec: CompartmentSpec) -> str:
    reached = [name for name in image.compartments if name != spec.name and image.may_reach(spec.name, name)]
    listed = ", ".join(reached) or "nothing"
    if spec.reaches is not None:
        return listed
    why = "hardened, so only what reaches: lists" if spec.hardening else "unhardened, so every compartment"
    return f"{listed}  (reaches: not declared; {why})"


def _describe_hardening(hardening: dict) -> str:
    parts = []
    if hardening.get("env") == "clean":
        parts.append("env clean")
    if hardening.get("network") == "none":
        parts.append("no network")
    if hardening.get("filesystem") is not None:
        fs = hardening["filesystem"]
        parts.append(f"filesystem read {fs['read'] or '-'} write {fs['write'] or '-'}")
    if hardening.get("seccomp") is not None:
        parts.append(f"seccomp {hardening['seccomp'].get('profile') or 'custom'}")
    limits = {k: v for k, v in (hardening.get("limits") or {}).items() if v is not None}
    if limits:
        parts.append("limits " + ", ".join(f"{k}={v}" for k, v in limits.items()))
    deny = (hardening.get("audit") or {}).get("deny")
    if deny:
        parts.append(f"audit deny {', '.join(deny)}")
    return "; ".join(parts) or "none"


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_config_option
@click.option("-m", "module", metavar="MODULE", help="Run a module, as python -m does.")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def run(config: str, module: str | None, args: tuple[str, ...]) -> None:
    """Run an unmodified app (SCRIPT [ARGS]... or -m MODULE [ARGS]...) under the image."""
    from flexos.config import load
    from flexos.runtime import run_module, run_path

    if module is None and not args:
        raise click.UsageError("give a script to run, or -m MODULE")
    try:
        image = load(config)
        if module is not None:
            run_module(module, list(args), image)
        else:
            run_path(args[0], list(args[1:]), image)
    except ConfigError as exc:
        _fail(exc.problems)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        sys.exit(130)
    except FlexosError as exc:
        traceback.print_exc()
        click.echo(f"flexos: {exc}", err=True)
        sys.exit(1)
    except BaseException:
        traceback.print_exc()  # the app's own uncaught exception, as python would print it
        sys.exit(1)


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
