"""What runs inside a vm compartment's guest: the agent (the guest's PID 1) and the compartment it forks.

The guest's /init (flexos/vm/image.py) execs ``python -m flexos.vm.guest``. The agent maps the
ivshmem window, imports once what every compartment needs, tells the host it is up, then serves the
host's commands on the agent mailbox:

- ``["start", epoch, boot]``: fork a compartment, which boots the image as ``python -m
  flexos.runtime.child`` does and answers ``["ready"]`` (or ``["error", traceback]``) on the
  compartment mailbox; the agent answers ``["started", pid]``. A restart costs a fork, not a boot.
- ``["kill"]``: SIGKILL the compartment, answer ``["killed", returncode]`` once it is reaped.

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

from flexos.errors import CompartmentCrashed, CompartmentStartError
from flexos.gates.link import Link
from flexos.image import Image
from flexos.runtime import Compartment
from flexos.transports.ivshmem import (
    AGENT_SLOT,
    EXITED,
    RUNNING,
    Liveness,
    Mailbox,
    WindowTransport,
    check_window,
    write_status,
)

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


def run_compartment(window: mmap.mmap, boot: dict) -> None:
    """The forked compartment: boot the image's compartment ``boot['name']`` and serve the host."""
    from flexos.runtime.child import link_back

    image = Image.from_dict(boot["image"])
    transport = WindowTransport(
        window,
        host=False,
        liveness=Liveness(),
        death=lambda: CompartmentCrashed(image.default, None, "the app went away"),
        spin_us=boot["spin_us"],
    )
    try:
        sys.path[:] = boot["sys_path"]
        sys.argv[:] = boot["argv"]
        if os.path.isdir(boot["cwd"]):
            os.chdir(boot["cwd"])
        runtime, parent = link_back(image, boot["name"], transport)
        for name, spec in image.compartments.items():
            if name != boot["name"] and not spec.default and spec.driver != "fcalls":
                runtime.compartments[name] = Compartment(name, link=_unreachable(name))
    except Exception:
        transport.mailbox.send(["error", traceback.format_exc()])
        os._exit(1)
    transport.mailbox.send(["ready"])
    transport.accept_loop(parent, lambda message, fds: runtime.control(image.default, message, fds))
    os._exit(0)


class _Unreachable:
    """The transport of a compartment a guest cannot be wired to: sockets do not cross into a VM."""

    def __init__(self, name: str) -> None:
        self._name = name

    def death(self) -> BaseException:
        return CompartmentStartError(
            f"compartment {self._name!r} cannot be reached from inside a virtual machine; place the modules "
            "both compartments use in the default compartment (or in this one)"
        )


def _unreachable(name: str) -> Link:
    link = Link(name)
    link.attach(_Unreachable(name))
    link.closed = True
    return link


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

    def start(self, epoch: int, boot: dict) -> None:
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
        self.mailbox.send(["started", pid])

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
        self.mailbox.send(["killed", self.exited.get(pid)])

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, self.reap)
        self.mailbox.send(["agent", {"python": sys.version.split()[0], "kernel": os.uname().release}])
        while True:
            message = self.mailbox.recv()
            if message[0] == "start" and len(message) == 3:
                self.start(message[1], message[2])
            elif message[0] == "kill":
                self.kill()


def main() -> None:
    window = map_window()
    check_window(window)
    # What every compartment imports, once, so that a forked compartment starts warm.
    import flexos.runtime.child  # noqa: F401

    Agent(window).serve()


if __name__ == "__main__":
    main()
