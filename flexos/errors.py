"""Exceptions flexos raises into application code.

Every error that crosses from flexos into an app is one of these, so an operator can catch
``flexos.FlexosError`` to tell isolation failures apart from the app's own exceptions.
"""

from __future__ import annotations

import signal


class FlexosError(Exception):
    """Base class of every error raised by flexos itself."""


class ConfigError(FlexosError):
    """A flexos.yaml is invalid. The message names the file, the line and the fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class DriverUnavailable(FlexosError):
    """The requested isolation mechanism cannot run on this machine or Python."""


class ProtocolError(FlexosError):
    """A compartment sent bytes that are not a valid flexos frame.

    Raised instead of ever interpreting hostile input as code: the frame is rejected and the
    channel it arrived on is discarded.
    """


class GateError(FlexosError):
    """A value cannot cross a gate (for example a self-referencing container)."""


class CompartmentStartError(FlexosError):
    """A compartment failed to boot."""


class CompartmentCrashed(FlexosError):
    """The compartment serving a call died (killed, crashed, exited) before replying.

    The app goes on: the compartment is restarted on next use unless its ``restart`` policy is
    ``never``. Objects that lived in the dead compartment are gone; using their proxies raises
    this error again.
    """

    def __init__(self, compartment: str, returncode: int | None, detail: str = "") -> None:
        self.compartment = compartment
        self.returncode = returncode
        self.signal: int | None = -returncode if returncode is not None and returncode < 0 else None
        self.exitcode: int | None = returncode if returncode is not None and returncode >= 0 else None
        super().__init__(self._describe(detail))

    def _describe(self, detail: str) -> str:
        if self.signal is not None:
            try:
                how = f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
            except ValueError:
                how = f"killed by signal {self.signal}"
        elif self.exitcode is not None:
            how = f"exited with code {self.exitcode}"
        else:
            how = "stopped responding"
        text = f"compartment {self.compartment!r} {how}"
        return f"{text}: {detail}" if detail else text

    def __reduce__(self):  # keep the exception copyable/pickle-safe for app-side logging
        return (type(self), (self.compartment, self.returncode))
