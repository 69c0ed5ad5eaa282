"""Starting the reference apps (apps/) plainly or under a flexos configuration, and always stopping them.

Every app runs in a session of its own, so that stopping it ends its whole process group: the
app and every compartment process it started, even when a step fails halfway.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.common.paths import APPS, FLEXOS, PYTHON

# app folder under apps/ -> the module that starts it
MODULES = {"kv": "kv", "http": "web", "sqlite": "sqlbench", "iperf": "iperf"}
_LISTENING = re.compile(r"listening on ([0-9.]+):(\d+)")


@dataclass(frozen=True)
class Variant:
    """One way to run an app: plainly (``config`` None) or under ``apps/APP/configs/CONFIG``."""

    key: str
    label: str
    config: str | None
    kind: str  # the mechanism family, for colours: none, fcalls, strict, subinterp, process, process-hardened


def mechanism_variants(*keys: str) -> list[Variant]:
    """No flexos, then ``apps/APP/configs/KEY.yaml`` for each key (fcalls, subinterp, process, ...)."""
    return [
        Variant("none", "no flexos", None, "none"),
        *(Variant(key, key.replace("-hardened", " + hardening"), f"{key}.yaml", key) for key in keys),
    ]


def config_path(app: str, variant: Variant) -> Path:
    path = APPS / app / "configs" / variant.config
    if not path.exists():
        raise SystemExit(f"{path} does not exist: the variant {variant.key!r} names a configuration that is missing")
    return path


def staged(app: str, variant: Variant, workdir: Path) -> Path:
    """The variant's flexos.yaml copied into the app's working directory, with the ``data``
    directory it may be granted: as deployed, the yaml sits beside the app's data, and flexos reads
    its relative paths (``./data``) from the yaml's directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)  # Landlock allows only paths that exist at start
    target = workdir / "flexos.yaml"
    shutil.copyfile(config_path(app, variant), target)
    return target


def refusal(app: str, variant: Variant) -> str | None:
    """Why this machine cannot run ``variant`` (``flexos check`` says so), or None."""
    if variant.config is None:
        return None
    with tempfile.TemporaryDirectory(prefix=f"flexos-{app}-") as workdir:
        proc = subprocess.run(  # staged as a run stages it, with the app's path: its modules are found
            [FLEXOS, "check", "-c", str(staged(app, variant, Path(workdir)))],
            capture_output=True,
            text=True,
            timeout=120,
            env=environment(app),
        )
    if proc.returncode == 0:
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "warning:" not in line]
    return "; ".join(lines) or f"flexos check exited {proc.returncode}"


def usable_variants(app: str, variants: list[Variant]) -> tuple[list[Variant], dict[str, str]]:
    """The variants this machine can run, and why each of the others is skipped (also printed)."""
    usable, skipped = [], {}
    for variant in variants:
        reason = refusal(app, variant)
        if reason is None:
            usable.append(variant)
        else:
            print(f"skipping {variant.label}: {reason}")
            skipped[variant.key] = reason
    return usable, skipped


def rotated(items: list, round_: int) -> list:
    """``items`` starting at position ``round_``: each round starts with another one (drift hits all alike)."""
    shift = round_ % len(items)
    return items[shift:] + items[:shift]


def command(app: str, variant: Variant, args: list[str], workdir: Path, launcher: Path | None = None) -> list[str]:
    """``python -m APP``, ``flexos run -c CONFIG -m APP``, or ``python LAUNCHER CONFIG APP`` (same
    arguments), the config staged in ``workdir``."""
    module = MODULES[app]
    if variant.config is None:
        return [PYTHON, "-m", module, *args]
    config = str(staged(app, variant, workdir))
    if launcher is not None:
        return [PYTHON, str(launcher), config, module, *args]
    return [FLEXOS, "run", "-c", config, "-m", module, *args]


def environment(app: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APPS / app), env.get("PYTHONPATH")]))
    return env


class AppProcess:
    """A running app; a context manager that stops its whole process group on exit."""

    def __init__(
        self, app: str, variant: Variant, args: list[str], workdir: Path, launcher: Path | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)  # Landlock allows only paths that exist at start
        self.app = app
        self.variant = variant
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen(
            command(app, variant, args, workdir, launcher),
            cwd=workdir,
            env=environment(app),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self._stderr: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.extend(self.proc.stderr), daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float, start: int = 0) -> re.Match[str]:
        """The first stdout line from index ``start`` on that matches ``pattern``; raises if the app exits first."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                for line in self.lines[start:]:
                    match = pattern.search(line)
                    if match:
                        return match
                start = len(self.lines)
                if self.proc.poll() is not None:
                    time.sleep(0.1)  # let the stderr reader finish
                    raise RuntimeError(self.failure(f"exited with status {self.proc.returncode}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(self.failure(f"printed no line matching {pattern.pattern!r} in {timeout} s"))
                self._new_line.wait(min(remaining, 0.2))

    def wait_listening(self, timeout: float = 60) -> int:
        """Wait for the app's 'listening on HOST:PORT' line; return the port."""
        return int(self.wait_for_line(_LISTENING, timeout).group(2))

    def failure(self, what: str) -> str:
        tail = "".join(self._stderr[-12:]).strip()
        return f"{self.app} ({self.variant.label}) {what}" + (f":\n{tail}" if tail else "")

    def stop(self) -> None:
        """End the app and its compartments: SIGTERM to the group, SIGKILL if it lingers."""
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(grace)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.wait()
        try:  # a compartment can outlive the app by a moment; never leave one behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> AppProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_to_end(
    app: str, variant: Variant, args: list[str], workdir: Path, timeout: float, launcher: Path | None = None
) -> list[str]:
    """Run an app that ends by itself; return its stdout lines (raises with its stderr if it fails)."""
    with AppProcess(app, variant, args, workdir, launcher) as process:
        try:
            process.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(process.failure(f"did not finish in {timeout} s")) from None
        time.sleep(0.05)
        if process.proc.returncode != 0:
            time.sleep(0.1)
            raise RuntimeError(process.failure(f"exited with status {process.proc.returncode}"))
        return list(process.lines)
