"""``process``: the compartment is its own OS process (page-table isolation).

The child is a fresh interpreter (``python -m flexos.runtime.child``), not a fork, so it inherits
none of the app's threads, objects or open files beyond what flexos hands it. Gates run over
shared-memory channels (:mod:`flexos.transports.shm`); the parent watches the child through a
pidfd, so a killed or crashed child wakes every waiting caller with CompartmentCrashed.
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
from flexos.errors import CompartmentCrashed, CompartmentStartError, ProtocolError
from flexos.gates.link import Link
from flexos.transports import PEER_CHANNELS
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
    strength = 3
    letter = "p"
    Options = ProcessOptions
    options: ProcessOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._proc: subprocess.Popen | None = None
        self._transport: ShmTransport | None = None
        self._pidfd: int | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, mirrors: dict) -> Link:
        name, options = self.spec.name, self.options
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "flexos.runtime.child", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                env=hardening.environment(self.spec.hardening),
            )
        finally:
            theirs.close()
        self._proc = proc
        boot = self.boot_record(spin_us=options.spin_us)
        try:
            ours.settimeout(options.start_timeout)
            ours.sendall(boot.to_wire())
            problem = control.read_boot_answer(control.decode(ours.recv(1 << 16)))
            ours.settimeout(None)
        except OSError as exc:
            problem = f"no answer ({exc})"
        except ProtocolError as exc:
            problem = str(exc)
        if problem is not None:
            ours.close()
            proc.kill()
            proc.wait()
            raise CompartmentStartError(f"compartment {name!r} failed to boot: {problem}")
        self._pidfd = os.pidfd_open(proc.pid)
        link = self.make_link(mirrors)
        self._transport = ShmTransport(
            ours,
            self._pidfd,
            select.POLLIN,
            death=lambda: self._death(proc),
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

    def _death(self, proc: subprocess.Popen) -> CompartmentCrashed:
        try:
            returncode = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            returncode = None
        return CompartmentCrashed(self.spec.name, returncode)

    def forget(self) -> bool:
        if self._transport is not None:
            self._transport.forget()
            self._transport = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        self._proc = None  # the parent's child: never ours to wait for or kill
        return True

    def stop(self) -> None:
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
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
