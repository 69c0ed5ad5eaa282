"""The shared-memory channel's wait strategy learns where its peer runs (flexos/transports/shm.py).

The policy is driven through a real RingChannel over real shared memory, with a peer whose
answer comes when the test decides: at once once we park (the peer needed our CPU), long after
(a slow call), or already there (a peer on another CPU). No timing is asserted, only which way
the channel chose; the bounds used are far from what a loaded machine could blur.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from flexos.transports import shm
from flexos.transports.shm import RingChannel

SEQ = 128 + 8 + 64  # direction 1->0's sequence number, which side 0 waits on (the layout in shm.py)


class ScriptedPeer(RingChannel):
    """Side 0 of a channel whose peer acts, when we park, as ``on_park`` says."""

    def __init__(self, spin_us: float, on_park: Callable[[mmap.mmap, int, int], None]) -> None:
        super().__init__(mmap.mmap(-1, 256 + 2 * 4096), 0, 0, 4096, spin_us)
        self._on_park = on_park
        self.next_value = 1

    def _block(self, offset: int, value: int, deadline: float | None = None) -> None:
        self._on_park(self._mm, offset, value)

    def _wake_peer(self) -> None:
        pass

    def wait_once(self) -> None:
        value, self.next_value = self.next_value, self.next_value + 1
        self._wait(SEQ, value)


def answer_at_once(mm: mmap.mmap, offset: int, value: int) -> None:
    shm._SEQ.pack_into(mm, offset, value)


def answer_later(mm: mmap.mmap, offset: int, value: int) -> None:
    time.sleep(0.02)
    shm._SEQ.pack_into(mm, offset, value)


@pytest.fixture(autouse=True)
def two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the learning rules apply where the peer can run on another CPU; this process has one")


def test_an_answer_right_after_parking_means_the_peer_needed_our_cpu() -> None:
    channel = ScriptedPeer(50_000, answer_at_once)  # a 50 ms spin finds nothing; parked, the answer is there
    channel.wait_once()
    assert channel._parking and channel.parked == 1 and channel.spun == 0
    for _ in range(shm._PROBE_EVERY_MIN - 1):  # from now on: one hand-over per wait, no spinning
        channel.wait_once()
    assert channel.parked == shm._PROBE_EVERY_MIN and channel.spun == 0


def test_a_failed_probe_doubles_the_probing_interval_and_a_successful_one_resumes_spinning() -> None:
    channel = ScriptedPeer(50_000, answer_at_once)
    for _ in range(shm._PROBE_EVERY_MIN + 1):  # the first wait teaches parking; the 16th after it probes
        channel.wait_once()
    assert channel._parking and channel._probe_every == 2 * shm._PROBE_EVERY_MIN
    for _ in range(2 * shm._PROBE_EVERY_MIN - 1):
        channel.wait_once()
    # The next wait probes, and this time the peer has already answered: it runs on another CPU.
    shm._SEQ.pack_into(channel._mm, SEQ, channel.next_value)
    channel.wait_once()
    assert not channel._parking and channel.spun == 1 and channel._probe_every == shm._PROBE_EVERY_MIN


def test_a_slow_answer_halves_the_spin_budget_and_a_quick_one_keeps_spinning() -> None:
    channel = ScriptedPeer(1_000, answer_later)  # spin 1 ms, then the answer comes 20 ms after parking
    channel.wait_once()
    assert not channel._parking and channel._budget == 500_000
    for _ in range(10):
        channel.wait_once()
    assert channel._budget == shm._SPIN_FLOOR_NS  # halved down to the floor, never to nothing
    shm._SEQ.pack_into(channel._mm, SEQ, channel.next_value)
    channel.wait_once()
    assert not channel._parking and channel.spun == 1


def test_a_process_confined_to_one_cpu_never_spins() -> None:
    """Under `taskset -c 0` the app side of a real process compartment's gate hands over at once."""
    script = textwrap.dedent(
        """
        import os, sys, tempfile, pathlib
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        lib = pathlib.Path(tempfile.mkdtemp())
        (lib / "echo_one_cpu.py").write_text("def f(x):\\n    return x\\n")
        sys.path.insert(0, str(lib))
        import flexos
        from flexos import CompartmentSpec, Image
        image = Image(
            compartments={"app": CompartmentSpec("app", "fcalls", default=True), "c": CompartmentSpec("c", "process")},
            libraries={"echo_one_cpu": "c"},
        )
        with flexos.boot(image) as runtime:
            import echo_one_cpu
            assert sum(echo_one_cpu.f(i) for i in range(300)) == sum(range(300))
            link = runtime.compartments["c"].link()
            print(sum(c.spun + c.missed for c in link._free), sum(c.parked for c in link._free))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spins, parked = map(int, done.stdout.split())
    assert spins == 0 and parked > 0
