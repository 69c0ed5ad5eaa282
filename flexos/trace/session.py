"""One ``flexos trace``: a learning run (if a command is given), every recorded run merged into a
proposal, its predicted cost, and what is written — a new flexos.yaml, or only the diff against
the one that exists.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexos.config import parse
from flexos.errors import ConfigError
from flexos.trace.cost import Prediction, calibration, predict
from flexos.trace.diff import compare
from flexos.trace.emit import cost_report, proposal_yaml, space_yaml
from flexos.trace.propose import Proposal, propose
from flexos.trace.runs import Runs, TraceError


@dataclass
class Outcome:
    proposal: Proposal
    prediction: Prediction
    status: int | None  # the traced app's exit status (None: no run this time)
    written: list[Path] = field(default_factory=list)
    report: list[str] = field(default_factory=list)  # what to print, in order


def runs_file(output: Path) -> Path:
    """Where the runs behind ``output`` are kept: ``flexos.yaml`` -> ``flexos.trace.json``."""
    return output.with_name(f"{output.stem}.trace.json")


def record(command: list[str]) -> tuple[dict[str, Any], int]:
    """Run ``command`` (``SCRIPT ARGS`` or ``-m MODULE ARGS``) once under the recorder, in a fresh
    interpreter with this one's stdio; its record and exit status. SIGTERM is passed on to it
    (a server's run ends that way) and SIGINT reaches it from the terminal."""
    if sys.version_info < (3, 12):
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        raise TraceError(f"flexos trace needs Python 3.12 or later (sys.monitoring, PEP 669); this is {version}")
    with tempfile.TemporaryDirectory(prefix="flexos-trace-") as tmp:
        out = Path(tmp) / "run.json"
        child = subprocess.Popen([sys.executable, "-m", "flexos.trace", str(out), *command])

        def forward(signum: int, frame: Any) -> None:
            child.send_signal(signum)

        previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in ((signal.SIGTERM, forward), (signal.SIGINT, signal.SIG_IGN))
        }
        try:
            status = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if not out.exists():
            raise TraceError(
                f"the traced run left no record (it exited with status {status}: killed, or it called os._exit); "
                "nothing was learned from it"
            )
        return json.loads(out.read_text()), status


def _drivers_to_price(proposal: Proposal) -> list[str]:
    """The chosen mechanisms, and the others a compartment could use in the app's process (cheap
    to calibrate; a vm guest's boot is not)."""
    from flexos.drivers import driver_class

    drivers = {c.mechanism for c in proposal.compartments}
    drivers |= {
        name
        for c in proposal.compartments
        for name, why in c.usable.items()
        if why is None and driver_class(name).in_app_process
    }
    return sorted(drivers)


def trace(
    output: Path,
    command: list[str] | None,
    runs_path: Path | None = None,
    fresh: bool = False,
    write: bool = False,
    space: Path | None = None,
    recalibrate: bool = False,
) -> Outcome:
    runs_path = runs_path or runs_file(output)
    runs = Runs() if fresh else Runs.load(runs_path)
    status = None
    if command:
        data, status = record(command)
        runs.add(data)
        runs.save(runs_path)
    if not runs.runs:
        raise TraceError(f"no run recorded in {runs_path}: give the command to learn from (flexos trace -- app.py ...)")
    proposal = propose(runs, str(output.resolve().parent))
    prediction = predict(proposal, calibration(_drivers_to_price(proposal), recalibrate))
    text = proposal_yaml(proposal, prediction)
    new_image = _validated(text, output, list(runs.runs[-1].sys_path))
    outcome = Outcome(proposal, prediction, status)
    outcome.report.append(f"learned from {len(runs.runs)} run(s), kept in {runs_path}")
    if output.exists():
        try:
            old_image, _ = parse(output)
        except ConfigError as exc:
            raise TraceError(f"{output} exists and flexos cannot read it:\n" + "\n".join(exc.problems)) from None
        changes = compare(old_image, new_image, proposal, str(output.resolve().parent))
        widening = sum(change.widens for change in changes)
        if not changes:
            outcome.report.append(f"{output} already is the proposal: nothing to change")
        else:
            head = f"{output} exists; the runs would change ({widening} widening):"
            outcome.report += [head, *(change.line() for change in changes)]
        if write and changes:
            output.write_text(text)
            outcome.written.append(output)
        elif changes:
            outcome.report.append(
                f"nothing written: review the changes, then take them with --write (or edit {output})"
            )
    else:
        output.write_text(text)
        outcome.written.append(output)
    if space is not None:
        space.write_text(space_yaml(proposal))
        outcome.written.append(space)
    outcome.report.append(cost_report(prediction))
    if outcome.written:
        outcome.report.append("wrote: " + ", ".join(str(p) for p in outcome.written))
    return outcome


def _validated(text: str, output: Path, search: list[str]) -> Any:
    """The proposal's Image with its paths as written (as an existing flexos.yaml is read to be
    compared), once flexos.config has read it where the app runs, from ``search`` (a proposal it
    refuses is a flexos bug)."""
    directory = output.parent if output.parent.exists() else Path(".")
    handle, name = tempfile.mkstemp(prefix=".flexos-trace-", suffix=".yaml", dir=directory)
    os.close(handle)
    try:
        Path(name).write_text(text)
        parse(name, search)
        image, _ = parse(name)
    except ConfigError as exc:
        raise TraceError(
            "flexos trace wrote a flexos.yaml flexos refuses (a bug):\n" + "\n".join(exc.problems)
        ) from None
    finally:
        os.unlink(name)
    return image
