"""``process``: the compartment is its own OS process (page-table isolation).

The child is a fresh interpreter (``python -I -m flexos.runtime.child``), not a fork, so it
inherits none of the app's threads, objects or open files beyond what flexos hands it: isolated
(no working directory on ``sys.path``, no user site, no ``PYTHON*`` variables), in a session of
its own without the app's terminal, stdin from /dev/null, stdout and stderr forwarded by the app
(:mod:`flexos.drivers.console`). Gates run over shared-memory channels
(:mod:`flexos.transports.shm`); the parent watches the child through a pidfd, so a killed or
crashed child wakes every waiting caller with CompartmentCrashed.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from flexos import hardening
from flexos.drivers.base import Driver, spin_us_option, start_timeout_option
from flexos.drivers.console import Console
from flexos.errors import CompartmentCrashed, CompartmentStartError, ProtocolError
from flexos.gates.link import Link
from flexos.transports import PEER_CHANNELS
from flexos.transports.bulk import open_port
from flexos.transports.shm import ShmTransport
from flexos.wire import control


@dataclass(frozen=True)
class ProcessOptions:
    spin_us: int = spin_us_option()
    start_timeout: float = start_timeout_option()


class ProcessDriver(Driver):
    name = "process"
    direct_siblings = True
    hardenable = True
    supports_timeout = True
    buffer_views = True
    strength = 3
    letter = "p"
    Options = ProcessOptions
    options: ProcessOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._proc: subprocess.Popen | None = None
        self._transport: ShmTransport | None = None
        self._pidfd: int | None = None
        self._console: Console | None = None
        self._faults: _FaultLog | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, mirrors: dict) -> Link:
        name, options = self.spec.name, self.options
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._console = console = Console(name)
        self._faults = faults = _FaultLog(name)
        try:
            proc = console.spawn(
                [*_interpreter(), "-m", "flexos.runtime.child", str(theirs.fileno()), str(faults.fd)],
                pass_fds=(theirs.fileno(), faults.fd),
                env=hardening.environment(self.spec.hardening),
            )
        except BaseException:
            faults.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        boot = self.boot_record(spin_us=options.spin_us)
        port, their_bulk_fds = open_port(views=self.image.buffer_sharing(name) == "view", max_frame=self.spec.max_reply)
        try:
            ours.settimeout(options.start_timeout)
            socket.send_fds(ours, [boot.to_wire()], their_bulk_fds)  # the compartment's side of the bulk port
            problem = control.read_boot_answer(control.decode(ours.recv(1 << 16)))
            ours.settimeout(None)
        except OSError as exc:
            problem = f"no answer ({exc})"
        except ProtocolError as exc:
            problem = str(exc)
        finally:
            for fd in their_bulk_fds:  # the compartment holds its own now
                os.close(fd)
        if problem is not None:
            port.close()
            faults.close()
            ours.close()
            proc.kill()
            proc.wait()
            console.stop()
            raise CompartmentStartError(f"compartment {name!r} failed to boot: {problem}")
        self._pidfd = os.pidfd_open(proc.pid)
        link = self.make_link(mirrors)
        link.carry_bulk(port)
        self._transport = ShmTransport(
            ours,
            self._pidfd,
            select.POLLIN,
            death=lambda: self._death(proc, console, faults),
            spin_us=options.spin_us,
            abort=proc.kill,
            max_frame=self.spec.max_reply,
            peer_channels=PEER_CHANNELS,
        )
        self._transport.run(link, lambda message, fds: self.host.control(name, message, fds), f"flexos-{name}")
        return link

    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        if self._transport is None:
            raise CompartmentCrashed(self.spec.name, None, "it is not running")
        self._transport.send_control(message, fds)

    def _death(self, proc: subprocess.Popen, console: Console, faults: _FaultLog) -> CompartmentCrashed:
        try:
            returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            returncode = None
        console.wait_drained()  # what it printed as it died comes first
        stack = faults.read()
        return CompartmentCrashed(self.spec.name, returncode, f"its own stack as it died:\n{stack}" if stack else "")

    def forget(self) -> bool:
        if self._faults is not None:
            self._faults.close()
            self._faults = None
        if self._transport is not None:
            self._transport.forget()
            self._transport = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._proc = None  # the parent's child: never ours to wait for or kill
        if self._console is not None:
            self._console.forget()
            self._console = None
        return True

    def stop(self) -> None:
        if self._faults is not None:
            self._faults.close()
            self._faults = None
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._console is not None:
            self._console.stop()
            self._console = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


class _FaultLog:
    """A memfd the compartment's faulthandler writes its threads' stacks to when it dies of a
    fatal signal: read (once) into the CompartmentCrashed the app gets."""

    def __init__(self, name: str) -> None:
        self.fd = os.memfd_create(f"flexos-{name}-faults")
        self._stack: str | None = None
        self._closed = False

    def read(self) -> str:
        if self._stack is None:
            try:
                self._stack = "" if self._closed else os.pread(self.fd, 1 << 16, 0).decode(errors="replace").strip()
            except OSError:
                self._stack = ""
        return self._stack

    def close(self) -> None:
        if not self._closed:
            self.read()  # a death reported after stop() still has its stack
            self._closed = True
            os.close(self.fd)


def _interpreter() -> list[str]:
    """The command that starts a compartment's Python: isolated from the working directory, the user
    site and ``PYTHON*`` variables (a compartment allowed to write there could plant code that its
    next instance imports before the hardening), keeping the app's own bytecode and UTF-8 choices."""
    flags = ["-I", "-u"]
    if sys.flags.dont_write_bytecode:
        flags.append("-B")
    if sys.flags.utf8_mode:
        flags += ["-X", "utf8"]
    return [sys.executable, *flags]
