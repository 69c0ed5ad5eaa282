"""What runs inside a vm compartment's guest: the agent (the guest's PID 1) and the compartment it forks.

The guest's /init (flexos/vm/image.py) execs ``python -m flexos.vm.guest``. The agent maps the
ivshmem window (having imported, once, what every compartment needs), tells the host it is up,
then serves the host's commands on the agent mailbox (the messages: :mod:`flexos.wire.control`):

- start (an epoch and a boot record): fork a compartment, which boots as ``python -m
  flexos.runtime.child`` does and answers ready (or the error) on the compartment mailbox; the
  agent answers started (the pid). A restart costs a fork, not a boot.
- kill: SIGKILL the compartment, answer killed (its exit status) once it is reaped.

Whenever the compartment exits, for any reason, the agent writes its status word in the window;
the host's waiters read it, so a crash in the guest becomes CompartmentCrashed like a crashed
process compartment. If the agent itself dies, the guest kernel panics and QEMU exits.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from flexos.errors import CompartmentCrashed, ProtocolError
from flexos.runtime.child import link_back
from flexos.transports.ivshmem import (
    AGENT_SLOT,
    COMPARTMENT_SLOT,
    EXITED,
    RUNNING,
    Liveness,
    Mailbox,
    WindowTransport,
    check_window,
    write_status,
)
from flexos.wire import control
from flexos.wire.control import BootRecord

_IVSHMEM = ("0x1af4", "0x1110")  # PCI vendor and device of ivshmem
_KILL_WAIT_S = 10


def map_window() -> mmap.mmap:
    """The ivshmem device's shared memory (its BAR 2), mapped through sysfs."""
    for device in sorted(Path("/sys/bus/pci/devices").iterdir()):
        ids = ((device / "vendor").read_text().strip(), (device / "device").read_text().strip())
        if ids != _IVSHMEM:
            continue
        if (device / "enable").read_text().strip() == "0":
            (device / "enable").write_text("1")
        fd = os.open(device / "resource2", os.O_RDWR)
        try:
            return mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    raise FileNotFoundError("no ivshmem device in this guest")


def run_compartment(window: mmap.mmap, boot: bytes) -> None:
    """The forked compartment: boot the compartment its boot record names and serve the host."""
    transport = None
    try:
        record = BootRecord.from_wire(boot)
        default = record.image.default
        transport = WindowTransport(
            window,
            host=False,
            liveness=Liveness(),
            death=lambda: CompartmentCrashed(default, None, "the app went away"),
            spin_us=record.spin_us,
        )
        sys.path[:] = record.sys_path
        sys.argv[:] = record.argv
        if record.cwd is not None and os.path.isdir(record.cwd):
            os.chdir(record.cwd)
        _runtime, parent = link_back(record, transport)
    except Exception:
        mailbox = transport.mailbox if transport is not None else Mailbox(window, COMPARTMENT_SLOT, 1, Liveness())
        mailbox.send(control.boot_failed(traceback.format_exc()))
        os._exit(1)
    transport.mailbox.send(control.ready())
    transport.accept_loop(parent)
    os._exit(0)


class Agent:
    """Starts, watches and kills the guest's one compartment process on the host's command."""

    def __init__(self, window: mmap.mmap) -> None:
        self.window = window
        self.mailbox = Mailbox(window, AGENT_SLOT, 1, Liveness())
        self.epoch = 0
        self.pid = 0
        self.exited: dict[int, int] = {}

    def reap(self, _signum: int = 0, _frame: object = None) -> None:
        """SIGCHLD: collect every exited child (PID 1 inherits orphans too); report the compartment's."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = os.waitstatus_to_exitcode(status)
            if pid == self.pid:
                write_status(self.window, self.epoch, self.exited[pid], pid, EXITED)

    def start(self, epoch: int, boot: bytes) -> None:
        self.epoch = epoch
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                run_compartment(self.window, boot)
            finally:
                os._exit(1)
        self.pid = pid
        write_status(self.window, epoch, 0, pid, RUNNING)
        if pid in self.exited:  # it died before we knew its pid
            write_status(self.window, epoch, self.exited[pid], pid, EXITED)
        self.mailbox.send(control.started(pid))

    def kill(self) -> None:
        pid = self.pid
        if pid and pid not in self.exited:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + _KILL_WAIT_S
            while pid not in self.exited and time.monotonic() < deadline:
                time.sleep(0.001)
        self.mailbox.send(control.killed(self.exited.get(pid)))

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, self.reap)
        self.mailbox.send(control.agent_hello(sys.version.split()[0], os.uname().release))
        while True:
            try:
                command = control.read_agent_command(self.mailbox.recv())
            except ProtocolError:
                continue
            if command.verb == control.START:
                self.start(command.epoch, command.boot)
            elif command.verb == control.KILL:
                self.kill()


def main() -> None:
    window = map_window()
    check_window(window)
    Agent(window).serve()


if __name__ == "__main__":
    main()
