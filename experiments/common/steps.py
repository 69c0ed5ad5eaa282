"""The command line every experiment has: ``experiment.py prepare|run|plot|all [--smoke] [--out DIR]``.

``prepare`` checks the machine (tools, configurations), ``run`` measures and writes CSV into the
output folder (``plots/`` next to the experiment by default), ``plot`` turns that CSV into PNG and
SVG there. ``--smoke`` runs a small version (CI); ``--out`` sends everything elsewhere.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STEPS = ("prepare", "run", "plot")


@dataclass(frozen=True)
class Context:
    """What a step needs: where to write, and whether this is the small CI version."""

    out: Path
    smoke: bool


def require_tools(*tools: tuple[str, str]) -> None:
    """Stop with how to install each missing program: ``(program, Debian package)`` pairs."""
    missing = [(program, package) for program, package in tools if shutil.which(program) is None]
    if missing:
        names = ", ".join(program for program, _ in missing)
        packages = " ".join(sorted({package for _, package in missing}))
        raise SystemExit(
            f"missing program(s): {names}. Install them with scripts/setup (or: apt-get install {packages})."
        )


def main(
    description: str,
    prepare: Callable[[Context], None],
    run: Callable[[Context], None],
    plot: Callable[[Context], None],
    folder: Path,
) -> None:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("step", choices=[*STEPS, "all"], help="what to do (all: prepare, run, plot)")
    parser.add_argument("--smoke", action="store_true", help="a small, quick version (what CI runs)")
    parser.add_argument("--out", type=Path, default=folder / "plots", help="where CSV and plots go (./plots)")
    args = parser.parse_args()
    context = Context(out=args.out.resolve(), smoke=args.smoke)
    context.out.mkdir(parents=True, exist_ok=True)
    actions = {"prepare": prepare, "run": run, "plot": plot}
    for step in STEPS if args.step == "all" else (args.step,):
        started = time.monotonic()
        print(f"== {folder.name}: {step}{' (smoke)' if args.smoke else ''}", flush=True)
        actions[step](context)
        print(f"== {folder.name}: {step} done in {time.monotonic() - started:.0f} s", flush=True)
    sys.stdout.flush()
