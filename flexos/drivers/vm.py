"""``vm``: the compartment runs in its own QEMU virtual machine; gates cross an ivshmem window.

FlexOS's ``vmept`` backend with stock parts: Debian's kernel and a busybox initramfs flexos builds
(:mod:`flexos.vm.image`), the host directories the compartment's code needs shared read-only over
virtio-9p, the host's own Python started in the guest (:mod:`flexos.vm.guest`), and a stock
``ivshmem-plain`` device carrying the channels (:mod:`flexos.transports.ivshmem`). The machine
itself (QEMU, the window, the guest agent, the pool) is :mod:`flexos.vm.machine`.

A guest that dies (QEMU exits, the guest kernel panics) or whose compartment dies, or that does not
answer within ``timeout``, becomes CompartmentCrashed, and ``restart:`` applies as for a process
compartment.
"""

from __future__ import annotations

import os
import select
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flexos.drivers.base import Driver, option, size_option, spin_us_option, start_timeout_option
from flexos.errors import CompartmentCrashed, CompartmentStartError, DriverUnavailable, ProtocolError
from flexos.gates.link import Link
from flexos.transports import CallTimeout, PeerGone
from flexos.transports.ivshmem import EXITED, WindowTransport, read_status
from flexos.vm import image as guest_image
from flexos.vm.machine import HostLiveness, Machine, _pool, choose_accelerator, guest_paths
from flexos.wire import control


@dataclass(frozen=True)
class GuestFiles:
    """Host directories the guest sees besides its code, read-only or writable."""

    read: list[str] = field(default_factory=list)
    write: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class VmOptions:
    memory: int = size_option(256 << 20, 128 << 20, "a guest needs at least 128MiB to start Python")
    vcpus: int = option(1, ge=1, le=64)
    accelerator: Literal["auto", "kvm", "tcg"] = "auto"
    boot_timeout: float = option(120.0, gt=0, le=3600)
    start_timeout: float = start_timeout_option()
    spin_us: int = spin_us_option()
    network: Literal["none", "user"] = "none"
    filesystem: GuestFiles = field(default_factory=GuestFiles)


class VmDriver(Driver):
    name = "vm"
    supports_timeout = True
    large_buffers = "copy them through its ivshmem window"
    strength = 4
    letter = "v"
    Options = VmOptions
    options: VmOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        accelerator, why = choose_accelerator(self.options.accelerator)
        if accelerator is None:
            raise DriverUnavailable(f"{self.image.source}: compartment {self.spec.name!r}: {why}")
        self.accelerator = accelerator
        self._machine: Machine | None = None
        self._previous: Machine | None = None  # the guest this compartment last ran in
        self._transport: WindowTransport | None = None

    @classmethod
    def unavailable(cls, options: VmOptions | None = None) -> str | None:
        """QEMU, a kernel and busybox must be here; an explicit accelerator must work here too."""
        reason = guest_image.unavailable()
        if reason is None and options is not None:
            accelerator, why = choose_accelerator(options.accelerator)
            if accelerator is None:
                return why
        return reason

    @classmethod
    def describe(cls, options: VmOptions) -> str:
        """The accelerator QEMU will use here and why, and the guest's kernel."""
        accelerator, why = choose_accelerator(options.accelerator)
        kernel = guest_image.find_kernel()
        parts = [f"accelerator {accelerator}: {why}" if accelerator else why]
        if kernel is not None:
            parts.append(f"kernel {kernel.version}")
        return "; ".join(parts)

    @property
    def pid(self) -> int | None:
        """QEMU's process on the host (the compartment's Python runs inside it)."""
        machine = self._machine
        return machine.process.pid if machine is not None and machine.process is not None else None

    @property
    def guest_pid(self) -> int | None:
        """The compartment's own pid inside its guest."""
        return self._machine.guest_pid if self._machine is not None else None

    def _machine_key(self) -> tuple:
        options = self.options
        mounts, links = guest_paths(options.filesystem.read, options.filesystem.write)
        return (options.memory, options.vcpus, self.accelerator, options.network, tuple(mounts), tuple(links))

    def start(self, mirrors: dict) -> Link:
        name, options = self.spec.name, self.options
        key = self._machine_key()
        machine = self._machine if self._machine is not None and self._machine.alive else None
        if machine is None:
            machine = _pool.take(key, self._previous)
        if machine is None:
            machine = Machine(key, self.accelerator)
            machine.boot(name, options, list(key[4]), list(key[5]), options.boot_timeout)
        self._machine = machine
        boot = self.boot_record(spin_us=options.spin_us, cwd=os.getcwd())
        try:
            epoch, _pid = machine.start_compartment(boot, options.start_timeout)
        except (PeerGone, CallTimeout) as exc:
            machine.stop()
            self._machine = None
            raise CompartmentStartError(f"compartment {name!r}: its guest agent did not start it ({exc!r})") from None
        transport = WindowTransport(
            machine.window,
            host=True,
            liveness=HostLiveness(machine, epoch),
            death=lambda: self._death(machine, epoch),
            spin_us=options.spin_us,
            abort=lambda: self._abort(machine),
            max_frame=self.spec.max_reply,
        )
        try:
            problem = control.read_boot_answer(transport.mailbox.recv(timeout=options.start_timeout))
        except (PeerGone, CallTimeout):
            problem = f"no answer within {options.start_timeout} s"
        except ProtocolError as exc:
            problem = str(exc)
        if problem is not None:
            transport.close()
            self.stop()
            raise CompartmentStartError(f"compartment {name!r} failed to boot in its virtual machine: {problem}")
        link = self.make_link(mirrors)
        self._transport = transport
        transport.run(link, lambda message, fds: self.host.control(name, message, fds), f"flexos-{name}")
        return link

    def _death(self, machine: Machine, epoch: int) -> CompartmentCrashed:
        if machine.alive and machine.pidfd >= 0:
            if select.select([machine.pidfd], [], [], 0)[0] == []:
                status_epoch, returncode, _pid, state = read_status(machine.window)
                if state == EXITED and status_epoch == epoch:
                    return CompartmentCrashed(self.spec.name, returncode, "inside its virtual machine")
        return CompartmentCrashed(
            self.spec.name, machine.returncode(), f"its virtual machine stopped{machine.console_tail()}"
        )

    def _abort(self, machine: Machine) -> None:
        """A call timed out: end the compartment in the guest, or the whole guest if its agent hangs too."""
        if not machine.kill_compartment():
            machine.kill()

    def send_control(self, message: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            raise DriverUnavailable(
                f"compartment {self.spec.name!r} runs in a virtual machine, which cannot be connected directly to "
                "other compartments; place the modules both need in the default compartment or the vm compartment"
            )
        if self._transport is None:
            raise CompartmentCrashed(self.spec.name, None, "it is not running")
        self._transport.send_control(message)

    def forget(self) -> bool:
        if self._transport is not None:
            self._transport.forget()
            self._transport = None
        if self._machine is not None:
            self._machine.forget()
            self._machine = None
        self._previous = None
        return True

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        machine, self._machine = self._machine, None
        if machine is None:
            return
        self._previous = machine
        if machine.alive and machine.kill_compartment():
            _pool.give(machine)
        else:
            machine.stop()
