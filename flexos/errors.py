"""Every exception flexos raises, so that an app can tell isolation failures from its own errors.

Every error that crosses from flexos into an app is a ``flexos.FlexosError``. The whole tree
(classes defined elsewhere name their module)::

    FlexosError
    ├── ConfigError               a flexos.yaml is invalid: one "FILE:LINE: what to change" per problem
    ├── DriverUnavailable         an isolation mechanism cannot run on this machine or Python
    ├── CompartmentStartError     a compartment failed to boot
    │   └── HardeningError        a protection it asks for cannot be applied (raised in its process)
    ├── CompartmentCrashed        the compartment serving a call died; it restarts on next use
    ├── GateError                 a value cannot cross a gate; or flexos's own error, raised by a compartment
    │   ├── TooManyHandles        (flexos.gates.handles) a compartment holds all the objects it may
    │   └── NotATree              (flexos.wire.codec) a value is cyclic or too deep to pack as a tree
    ├── ProtocolError             a peer sent bytes that are not a valid flexos frame
    │   └── ReplyTooLarge         (flexos.transports) a frame over the compartment's max_reply
    ├── PeerGone                  (flexos.transports) the peer is dead      ┐ a transport's signals to
    ├── CallTimeout               (flexos.transports) no answer in time     │ its link, which raises
    ├── ChannelClosed             (flexos.transports) one channel dropped   ┘ the errors above instead
    ├── RemoteTraceback           the __cause__ of an exception from a compartment: where it was raised there
    ├── BenchmarkFailed           (flexos.explore.engines) flexos explore's benchmark failed
    └── TraceError                (flexos.trace.runs) no run to learn from, or a record flexos cannot read

    UserWarning
    └── ConfigWarning             (flexos.config) a flexos.yaml is valid but likely not what was meant

Each keeps its full message when pickled or copied (an app may log or send it elsewhere).
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

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems,), self.__dict__)


class DriverUnavailable(FlexosError):
    """The requested isolation mechanism cannot run on this machine or Python."""


class ProtocolError(FlexosError):
    """A compartment sent bytes that are not a valid flexos frame.

    Raised instead of ever interpreting hostile input as code: the frame is rejected and the
    channel it arrived on is discarded.
    """


class GateError(FlexosError):
    """A value cannot cross a gate (for example a self-referencing container).

    Also what one of flexos's own exceptions raised in a compartment arrives as: a compartment
    cannot make the app believe that flexos raised it (docs/gates.md, Exceptions).
    """


class CompartmentStartError(FlexosError):
    """A compartment failed to boot."""


class HardeningError(CompartmentStartError):
    """A requested protection could not be applied; the compartment must not start.

    Raised inside the compartment's process (flexos/hardening.py), which then reports its boot as
    failed: the app sees the CompartmentStartError naming the option.
    """


class CompartmentCrashed(FlexosError):
    """The compartment serving a call died (killed, crashed, exited) before replying.

    The app goes on: the compartment is restarted on next use unless its ``restart`` policy is
    ``never``. Objects that lived in the dead compartment are gone; using their proxies raises
    this error again.
    """

    def __init__(self, compartment: str, returncode: int | None, detail: str = "") -> None:
        self.compartment = compartment
        self.returncode = returncode
        self.detail = detail
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

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.compartment, self.returncode, self.detail), self.__dict__)


# C0 and C1 controls but newline and tab, and the bidirectional overrides (a terminal would act on
# them, or show text other than what it is): what another compartment's text shows as escapes.
_SHOWN_AS_ESCAPES = {
    code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    for code in (*range(0x20), *range(0x7F, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    if code not in (0x09, 0x0A)
}


class RemoteTraceback(FlexosError):
    """Where an exception that arrives from a compartment was raised there: its traceback in that
    compartment, as text. flexos sets it as the ``__cause__`` of the exception the caller receives
    (as ``concurrent.futures`` does for a worker process's exception), so a traceback shows both
    sides while the exception's own ``__notes__`` stay exactly the library's.

    flexos never raises it. The text is the compartment's to write; control characters other
    than newlines and tabs are escaped before it is shown.
    """

    def __init__(self, compartment: str, text: str) -> None:
        text = text.translate(_SHOWN_AS_ESCAPES)
        super().__init__(compartment, text)
        self.compartment = compartment
        self.text = text

    def __str__(self) -> str:
        return f"raised in compartment {self.compartment!r}:\n\n{self.text.rstrip()}"

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.compartment, self.text), self.__dict__)
