"""A vm compartment's machine, host side: QEMU, its shared window, the guest agent, the warm pool.

The VMM lives here, the driver (:mod:`flexos.drivers.vm`) only dispatches (as kraftkit keeps
``machine/qemu`` apart from its driver). A guest boots once and is then reused: a compartment
(re)start is a fork by the guest's agent, and a stopped compartment's guest goes back to a small
pool that later runtimes of this process take from (bounded; shut down at exit). QEMU is started
from one long-lived thread with ``PR_SET_PDEATHSIG`` so it dies with this process however that
ends.
"""

from __future__ import annotations

import atexit
import collections
import logging
import mmap
import os
import queue
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from flexos import probe
from flexos.errors import CompartmentStartError, ProtocolError
from flexos.transports import CallTimeout, PeerGone
from flexos.transports.ivshmem import (
    AGENT_SLOT,
    EXITED,
    HOST_CHANNEL_MAX_PAUSE_S,
    SLOTS,
    WINDOW_SIZE,
    Liveness,
    Mailbox,
    format_window,
    read_status,
    reset_slots,
)
from flexos.vm import image as guest_image
from flexos.wire import control

if TYPE_CHECKING:
    from flexos.drivers.vm import VmOptions

FLEXOS_HOME = Path(__file__).resolve().parent.parent  # the flexos package directory

log = logging.getLogger("flexos.vm")

POOL_SIZE = 2  # idle guests kept per process for reuse
_KILL_TIMEOUT_S = 10
_CONSOLE_LINES = 200  # a kernel panic's register dump follows its one telling line
_STAGES = {
    "flexos-init: kernel up": "kernel up",
    "flexos-init: modules loaded": "virtio and 9p loaded",
    "flexos-init: host files mounted": "host files mounted, starting Python",
}


def choose_accelerator(requested: str) -> tuple[str | None, str]:
    """(accelerator, why) for ``requested`` (auto | kvm | tcg); None when the requested one cannot run here."""
    if requested == "tcg":
        return "tcg", "software emulation, as configured"
    kvm = probe.kvm()
    backend = probe.kvm_backend()
    if not kvm.available:
        problem = kvm.detail
    elif backend == "kvm_pvm":
        problem = "/dev/kvm is backed by kvm_pvm (nested PVM), which cannot boot a stock kernel"
    else:
        return "kvm", f"hardware virtualization ({backend or 'kvm'})"
    if requested == "kvm":
        return None, f"accelerator kvm cannot be used here: {problem}; use accelerator auto or tcg"
    return "tcg", f"software emulation (TCG), because {problem}"


def guest_paths(
    read: Sequence[str] = (), write: Sequence[str] = ()
) -> tuple[list[tuple[str, bool]], list[tuple[str, str]]]:
    """The host directories a guest mounts, as (path, writable), and the symlinks it recreates.

    By default only what the compartment's code needs, read-only: the system's /usr (shared
    libraries), the interpreter's prefixes, flexos itself, and the app's sys.path entries. ``read``
    and ``write`` add directories.
    """
    wanted: dict[str, bool] = {}

    def add(path: str, writable: bool) -> None:
        real = os.path.realpath(path or os.getcwd())
        if os.path.isfile(real):
            real = os.path.dirname(real)
        if os.path.isdir(real):
            wanted[real] = wanted.get(real, False) or writable

    for path in ("/usr", sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(FLEXOS_HOME)):
        add(path, False)
    for path in sys.path:
        add(path, False)
    for path in read:
        add(os.path.abspath(path), False)
    for path in write:
        add(os.path.abspath(path), True)
    mounts: list[tuple[str, bool]] = []
    for path in sorted(wanted, key=lambda p: (p.count("/"), p)):
        covered = any(path.startswith(outer.rstrip("/") + "/") and wanted[outer] == wanted[path] for outer, _ in mounts)
        if not covered:
            mounts.append((path, wanted[path]))
    links = []
    for name in ("/bin", "/lib", "/lib64", "/sbin"):  # merged-/usr systems: /lib -> usr/lib ...
        if os.path.islink(name):
            links.append((os.readlink(name), name))
        elif os.path.isdir(name):
            mounts.append((name, False))
    return mounts, links


class _Launcher:
    """Starts QEMU from one thread that lives as long as this process.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, and compartments start
    from whichever thread imports first; from this thread, QEMU gets SIGKILL exactly when this
    process ends, however it ends.
    """

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def spawn(self, argv: list[str], **kwargs: Any) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, daemon=True, name="flexos-vm-launcher")
                self._thread.start()
        answer: queue.Queue = queue.Queue()
        setpriv = shutil.which("setpriv")
        self._requests.put(([setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv, kwargs, answer))
        result = answer.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def _serve(self) -> None:
        while True:
            argv, kwargs, answer = self._requests.get()
            try:
                answer.put(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:
                answer.put(exc)


class HostLiveness(Liveness):
    """The host pauses in select() on QEMU's pidfd (a dying VM wakes it at once) and reads the
    compartment's status word (its exit in the guest)."""

    channel_max_pause = HOST_CHANNEL_MAX_PAUSE_S

    def __init__(self, machine: Machine, epoch: int | None = None) -> None:
        self._machine = machine
        self._epoch = epoch

    def pause(self, seconds: float) -> None:
        pidfd = self._machine.pidfd
        if pidfd < 0 or select.select([pidfd], [], [], seconds)[0]:  # shut down, or QEMU exited
            raise PeerGone()

    def check(self) -> None:
        if self._epoch is not None:
            epoch, _returncode, _pid, state = read_status(self._machine.window)
            if state == EXITED and epoch == self._epoch:
                raise PeerGone()


class Machine:
    """One QEMU guest: its process, the shared window, the agent's mailbox, its console's last lines."""

    def __init__(self, key: tuple, accelerator: str) -> None:
        self.key = key
        self.accelerator = accelerator
        self.process: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        # The window QEMU maps as the guest's ivshmem device (through the memfd, closed once QEMU has it).
        self._memfd = os.memfd_create("flexos-vm-window", 0)
        os.ftruncate(self._memfd, WINDOW_SIZE)
        self.window = mmap.mmap(self._memfd, WINDOW_SIZE)
        self.console: collections.deque[str] = collections.deque(maxlen=_CONSOLE_LINES)
        self.boot_seconds = 0.0
        self.epoch = 0
        self.guest_pid: int | None = None
        self._rundir: str | None = None
        self._lock = threading.Lock()
        self._stage = threading.Event()
        self._agent = Mailbox(self.window, AGENT_SLOT, 0, HostLiveness(self))

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def boot(self, name: str, options: VmOptions, mounts: list, links: list, timeout: float) -> None:
        """Start QEMU and wait (at most ``timeout`` s) for the guest's agent, showing progress."""
        started = time.monotonic()
        built = guest_image.build()
        memfd = self._memfd
        try:
            format_window(self.window)
            self._rundir = tempfile.mkdtemp(prefix="flexos-vm-")
            initrd = Path(self._rundir) / "initrd"
            config = [f"mount fx{i} {'rw' if writable else 'ro'} {path}" for i, (path, writable) in enumerate(mounts)]
            config += [f"link {target} {path}" for target, path in links if " " not in target]
            if options.network == "user":
                config.append("net")
            config.append(f"python {sys.executable} {FLEXOS_HOME.parent}")
            initrd.write_bytes(built.initramfs.read_bytes() + guest_image.boot_archive(config))
            argv = self._argv(options, built.kernel, initrd, memfd, mounts)
            process = self.process = _launcher.spawn(  # in a session of its own: no terminal of the app's
                argv,
                pass_fds=(memfd,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            self._close_memfd()
        self.pidfd = os.pidfd_open(process.pid)
        threading.Thread(
            target=self._read_console, args=(name, started, process.stdout), daemon=True, name="flexos-vm-console"
        ).start()
        try:
            hello = self._agent.recv(timeout=timeout)
        except (PeerGone, CallTimeout) as exc:
            why = "did not come up within its boot_timeout" if isinstance(exc, CallTimeout) else "stopped"
            self.stop()
            raise CompartmentStartError(
                f"compartment {name!r}: its virtual machine {why} ({timeout} s){self.console_tail()}"
            ) from None
        self.boot_seconds = time.monotonic() - started
        shutil.rmtree(self._rundir, ignore_errors=True)  # QEMU loaded the initrd before the guest ran
        self._rundir = None
        try:
            python = control.read_agent_hello(hello).get("python")
        except ProtocolError as exc:
            self.stop()
            raise CompartmentStartError(f"compartment {name!r}: {exc}") from None
        _progress(name, f"ready ({self.accelerator}, Python {python})", self.boot_seconds, True)

    def _argv(self, options: VmOptions, kernel: Path, initrd: Path, memfd: int, mounts: list) -> list[str]:
        accel = "kvm" if self.accelerator == "kvm" else "tcg,tb-size=64"
        argv = [
            guest_image.QEMU,
            *("-M", "pc", "-accel", accel, "-m", f"{options.memory >> 20}M", "-smp", str(options.vcpus)),
            *("-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"),
            *("-kernel", str(kernel), "-initrd", str(initrd)),
            *("-append", "console=ttyS0 quiet panic=-1 rdinit=/init"),
            *("-object", f"memory-backend-file,id=window,share=on,mem-path=/proc/self/fd/{memfd},size={WINDOW_SIZE}"),
            *("-device", "ivshmem-plain,memdev=window"),
        ]
        argv += ["-nic", "user,model=virtio-net-pci"] if options.network == "user" else ["-nic", "none"]
        for index, (path, writable) in enumerate(mounts):
            readonly = "" if writable else ",readonly=on"
            escaped = path.replace(",", ",,")
            argv += [
                "-virtfs",
                f"local,path={escaped},mount_tag=fx{index},security_model=none,multidevs=remap{readonly}",
            ]
        return argv

    def _read_console(self, name: str, started: float, console: IO[bytes]) -> None:
        for raw in console:
            line = _ANSI.sub("", raw.decode("utf-8", "replace")).rstrip()
            if not line:
                continue
            self.console.append(line)
            log.debug("vm %s console: %s", name, line)
            for marker, stage in _STAGES.items():
                if marker in line:
                    _progress(name, stage, time.monotonic() - started)

    def console_tail(self, lines: int = 6) -> str:
        """The console's last telling lines: flexos's and Python's own, and the kernel's panic line
        (not the register dump that follows it)."""
        console = list(self.console)
        telling = [line for line in console if not line.startswith("[") or "panic" in line.lower()]
        tail = (telling or console)[-lines:]
        return ("; its console ended with:\n  " + "\n  ".join(tail)) if tail else ""

    def start_compartment(self, boot: control.BootRecord, timeout: float) -> tuple[int, int]:
        """Ask the agent to fork compartment ``boot``; (epoch, guest pid). Its mailbox is slot 1, zeroed here."""
        with self._lock:
            self.epoch += 1
            reset_slots(self.window, range(1, SLOTS))
            self._agent.send(control.start(self.epoch, boot), timeout=timeout)
            try:
                self.guest_pid = control.read_started(self._agent.recv(timeout=timeout))
            except ProtocolError as exc:
                raise CompartmentStartError(str(exc)) from None
            return self.epoch, self.guest_pid

    def kill_compartment(self) -> bool:
        """SIGKILL the compartment in the guest; False if the agent does not confirm in time."""
        with self._lock:
            try:
                self._agent.send(control.kill(), timeout=_KILL_TIMEOUT_S)
                control.read_killed(self._agent.recv(timeout=_KILL_TIMEOUT_S))
            except (PeerGone, CallTimeout, ProtocolError, OSError, ValueError):
                return False
            return True

    def returncode(self) -> int | None:
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL QEMU (its guest and the compartment in it); ``stop`` then cleans up."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        """End QEMU (SIGKILL: the guest keeps nothing worth a clean shutdown) and free the window."""
        self._agent.closed = True
        self._close_memfd()
        process = self.process
        if process is not None:
            process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def _close_memfd(self) -> None:
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def forget(self) -> None:
        """In a forked child: the parent's guest; let go of it without touching it."""
        self._close_memfd()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self.process = None
        self._rundir = None


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")


def _progress(name: str, stage: str, elapsed: float, done: bool = False) -> None:
    """Boot progress: a log record always, and a status line on an interactive stderr."""
    log.info("vm compartment %r: %s (%.1f s)", name, stage, elapsed)
    if sys.stderr is not None and sys.stderr.isatty():
        end = "\n" if done else ""
        sys.stderr.write(f"\r\x1b[Kflexos: booting vm compartment {name!r}: {stage} ({elapsed:.1f} s){end}")
        sys.stderr.flush()


class _Pool:
    """Booted guests no compartment uses right now, reused by the next start with the same machine."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._idle: list[Machine] = []
        self._lock = threading.Lock()

    def take(self, key: tuple, preferred: Machine | None = None) -> Machine | None:
        """An idle guest for ``key``: ``preferred`` (the one a restarting compartment just left) if idle,
        else the one given back last (a stopped runtime's guest goes to the next runtime)."""
        with self._lock:
            candidates = sorted(reversed(self._idle), key=lambda machine: machine is not preferred)
            for machine in candidates:
                if machine.key == key:
                    self._idle.remove(machine)
                    if machine.alive:
                        return machine
                    machine.stop()
        return None

    def give(self, machine: Machine) -> None:
        with self._lock:
            self._idle.append(machine)
            evicted = self._idle[: -self._size] if len(self._idle) > self._size else []
            del self._idle[: len(evicted)]
        for old in evicted:
            old.stop()

    def stop(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for machine in idle:
            machine.stop()

    def forget(self) -> None:
        for machine in self._idle:
            machine.forget()
        self._idle = []
        self._lock = threading.Lock()


_launcher = _Launcher()
_pool = _Pool(POOL_SIZE)
atexit.register(_pool.stop)


def _after_fork_in_child() -> None:
    global _launcher
    _launcher = _Launcher()
    _pool.forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
