"""seccomp answers every system call ABI but the native one: an x32 call neither slips past the
filter nor kills the thread serving the app's call (tests/fixtures/x32caller.py)."""

from __future__ import annotations

import errno
import os
import platform

import pytest
from boxes import booted, hardened, image

from flexos import CompartmentSpec

GETPID, EXECVE = 39, 59  # x86_64 (and x32) numbers
I386_GETPID = 20

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI exists on x86_64 only")


def test_an_x32_system_call_is_refused_and_the_compartment_goes_on() -> None:
    box = CompartmentSpec("box", "process", timeout=10, hardening=hardened(audit=("subprocess",)))
    with booted(image({"x32caller": "box"}, box=box), ("x32caller",)) as runtime:
        import x32caller

        assert x32caller.call(GETPID) == (-1, errno.ENOSYS)
        assert x32caller.call(EXECVE, b"/bin/true", None, None) == (-1, errno.ENOSYS)
        assert x32caller.native(GETPID) == runtime.compartments["box"].pid != os.getpid()


def test_an_i386_system_call_is_refused_too() -> None:
    box = CompartmentSpec("box", "process", timeout=10, hardening=hardened(audit=("subprocess",)))
    unfiltered = CompartmentSpec("box", "process", timeout=10)
    with booted(image({"x32caller": "box"}, box=unfiltered), ("x32caller",)) as runtime:
        import x32caller

        if x32caller.int80(I386_GETPID) != runtime.compartments["box"].pid:
            pytest.skip("this kernel runs no i386 system calls (no IA32 emulation)")
    with booted(image({"x32caller": "box"}, box=box), ("x32caller",)) as runtime:
        import x32caller

        assert x32caller.int80(I386_GETPID) == -errno.ENOSYS
        assert x32caller.native(GETPID) == runtime.compartments["box"].pid
