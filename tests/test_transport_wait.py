"""The shared-memory channel's wait strategy learns where its peer runs (flexos/transports/shm.py).

The policy is driven through a real RingChannel over real shared memory whose spins end as the
test scripts (the C spin's outcomes are tested in test_ring.py), and under `taskset` end to end.
No timing is asserted, only which way the channel chose.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from flexos.transports import shm
from flexos.transports.shm import RingChannel

SEQ = 192 + 8  # direction 1->0's sequence number, which side 0 waits on (the layout in shm.py)
ACK = 128 + 16  # direction 0->1's acknowledgement: the peer picked up our frame


class ScriptedPeer(RingChannel):
    """Side 0 of a channel that has sent one frame; each spin ends as the test scripts it (the
    ns it took, MISSED or NEEDS_CPU), and a park finds the answer after ``park_ns`` on the
    scripted clock (``clock``, which ``shm._now_ns`` reads in these tests)."""

    clock = 0

    def __init__(self, spin_us: float = 200) -> None:
        super().__init__(mmap.mmap(-1, 256 + 2 * 4096), 0, 0, 4096, spin_us)
        self._out_seq = 1
        self.outcome = shm.MISSED
        self.spins: list[int] = []  # the budget of each spin
        self._poll_for = self._scripted
        self.next_value = 1
        self.park_ns = 0

    def _scripted(self, offset: int, value: int, budget: int) -> int:
        self.spins.append(budget)
        return self.outcome

    def _block(self, offset: int, value: int, deadline: float | None = None) -> None:
        ScriptedPeer.clock += self.park_ns
        shm._SEQ.pack_into(self._mm, offset, value)

    def _wake_peer(self) -> None:
        pass

    def wait_once(self, outcome: int, peer_took_it: bool = True) -> None:
        self.outcome = outcome
        shm._SEQ.pack_into(self._mm, ACK, self._out_seq if peer_took_it else 0)
        value, self.next_value = self.next_value, self.next_value + 1
        self._wait(SEQ, value)


@pytest.fixture(autouse=True)
def scripted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_now_ns", lambda: ScriptedPeer.clock)


@pytest.fixture(autouse=True)
def two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the learning rules apply where the peer can run on another CPU; this process has one")


def test_spins_that_find_the_peer_could_not_run_switch_to_parking() -> None:
    channel = ScriptedPeer()
    for _ in range(shm._SUSPICIONS_TO_PARK - 1):
        channel.wait_once(shm.NEEDS_CPU)
    channel.wait_once(100)  # one answer while spinning clears the suspicion
    assert not channel._parking
    for _ in range(shm._SUSPICIONS_TO_PARK):
        channel.wait_once(shm.NEEDS_CPU)
    assert channel._parking
    spins = len(channel.spins)
    for _ in range(shm._PROBE_EVERY_MIN - 1):  # from now on: one hand-over per wait, no spinning
        channel.wait_once(shm.NEEDS_CPU)
    assert len(channel.spins) == spins


def test_a_failed_probe_doubles_the_probing_interval_and_a_successful_one_resumes_spinning() -> None:
    channel = ScriptedPeer()
    for _ in range(shm._SUSPICIONS_TO_PARK + shm._PROBE_EVERY_MIN):  # taught to park; the 16th wait probes
        channel.wait_once(shm.NEEDS_CPU)
    assert channel._parking and channel._probe_every == 2 * shm._PROBE_EVERY_MIN
    assert channel.spins[-1] == shm._PROBE_SPIN_NS
    for _ in range(2 * shm._PROBE_EVERY_MIN - 1):
        channel.wait_once(shm.NEEDS_CPU)
    channel.wait_once(shm.MISSED)  # this probe says the peer could have run: it runs elsewhere
    assert not channel._parking and channel._probe_every == shm._PROBE_EVERY_MIN


def test_a_peer_that_runs_but_answers_late_halves_the_budget_down_to_a_floor() -> None:
    """Late: the whole wait took longer than the most the channel spins (1 ms here)."""
    channel = ScriptedPeer(1_000)
    channel.park_ns = 2_000_000
    channel.wait_once(shm.MISSED)
    assert not channel._parking and channel._budget == 500_000
    channel.wait_once(shm.MISSED, peer_took_it=False)  # not picked up yet: maybe waking, budget kept
    assert channel._budget == 500_000
    for _ in range(10):
        channel.wait_once(shm.MISSED)
    assert not channel._parking and channel._budget == shm._SPIN_FLOOR_NS
    channel.wait_once(shm._SPIN_FLOOR_NS)  # it took the whole budget: allow more
    assert channel._budget == 2 * shm._SPIN_FLOOR_NS


def test_calls_a_little_slower_than_the_budget_in_a_row_are_spun_for_next_time() -> None:
    """Every wait ends parked, soon after the spin gave up (within the 1 ms the channel may
    spin): the fourth in a row sets the budget to twice its length, so the next ones end
    spinning instead of in a wake-up; never more than the most it spins."""
    channel = ScriptedPeer(1_000)
    channel._budget = shm._SPIN_FLOOR_NS
    channel.park_ns = 10_000
    for _ in range(shm._SLOW_WAITS_TO_GROW - 1):
        channel.wait_once(shm.MISSED)
        assert channel._budget == shm._SPIN_FLOOR_NS
    channel.wait_once(shm.MISSED)
    assert channel._budget == 2 * (shm._SPIN_FLOOR_NS + 10_000)
    channel.park_ns = 600_000  # each wait still within the 1 ms, but twice one is more
    for _ in range(shm._SLOW_WAITS_TO_GROW):
        channel.wait_once(shm.MISSED)
    assert channel._budget == 1_000_000


def test_one_slow_wait_among_answers_found_spinning_only_halves_the_budget() -> None:
    """On a busy machine a peer preempted mid-call answers late now and then: spinning longer
    would steal its CPU. A streak of slow waits is broken by any answer found spinning, and by
    a wait longer than the most the channel spins."""
    channel = ScriptedPeer(1_000)
    channel.park_ns = 10_000
    for _ in range(4 * shm._SLOW_WAITS_TO_GROW):
        channel.wait_once(shm.MISSED)
        channel.wait_once(1_000)  # the next answer is found spinning
    assert channel._budget == shm._SPIN_FLOOR_NS
    for _ in range(shm._SLOW_WAITS_TO_GROW - 1):
        channel.wait_once(shm.MISSED)
    channel.park_ns = 2_000_000
    channel.wait_once(shm.MISSED)  # over the most it spins: a slow call
    channel.park_ns = 10_000
    channel.wait_once(shm.MISSED)
    assert channel._budget == shm._SPIN_FLOOR_NS


def test_a_process_confined_to_one_cpu_never_spins() -> None:
    """Under `taskset -c 0` the app side of a real process compartment's gate hands over at once,
    and never probes: the compartment inherited the affinity, so it can never run elsewhere."""
    script = textwrap.dedent(
        """
        import os, sys, tempfile, pathlib
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        lib = pathlib.Path(tempfile.mkdtemp())
        (lib / "echo_one_cpu.py").write_text("def f(x):\\n    return x\\n")
        sys.path.insert(0, str(lib))
        import flexos
        import flexos.transports.shm as shm
        from flexos import CompartmentSpec, Image
        image = Image(
            compartments={"app": CompartmentSpec("app", "fcalls", default=True), "c": CompartmentSpec("c", "process")},
            libraries={"echo_one_cpu": "c"},
        )
        with flexos.boot(image) as runtime:
            import echo_one_cpu
            calls = 3 * shm._PROBE_EVERY_MAX  # past the longest probing interval: it never probes
            assert sum(echo_one_cpu.f(i) for i in range(calls)) == sum(range(calls))
            link = runtime.compartments["c"].link()
            print(sum(c.spun + c.missed for c in link._free), sum(c.parked for c in link._free))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spins, parked = map(int, done.stdout.split())
    assert spins == 0 and parked > 0


WAIT_BRANCHES = ["spinning", "parking", "probing", "deadline"]


@contextlib.contextmanager
def channel_pair(branch: str) -> Iterator[tuple[shm.ShmChannel, shm.ShmChannel, float | None]]:
    """Two real ShmChannel sides (ours, theirs) and a deadline; ours waits the way ``branch``
    names (one of WAIT_BRANCHES)."""
    watch_r, watch_w = os.pipe()
    ours, fds = shm.ShmChannel.create(watch_r, select.POLLIN)
    theirs = shm.ShmChannel((fds[0], fds[1], fds[2]), 1, watch_r, select.POLLIN)
    ours._parking = branch != "spinning"
    ours._never_spin = False
    ours._waits_since_probe = ours._probe_every - 1 if branch == "probing" else 0
    try:
        yield ours, theirs, time.monotonic() + 60 if branch == "deadline" else None
    finally:
        ours.close()
        theirs.close()
        os.close(watch_r)
        os.close(watch_w)


@pytest.mark.parametrize("branch", WAIT_BRANCHES)
def test_a_reply_already_there_is_taken_once_whichever_way_the_channel_waits(branch: str) -> None:
    """Ring.exchange takes a reply it finds at once; the channel must not take it a second time
    (which would skip a sequence number, and hang the next call waiting for one never sent)."""
    with channel_pair(branch) as (ours, theirs, deadline):
        for n in range(3):
            theirs.send(b"reply %d" % n)  # the peer's frame is there before ours goes out
            assert ours.exchange(b"call %d" % n, deadline) == b"reply %d" % n
            assert theirs.recv() == b"call %d" % n
        assert ours._in_seq == ours._out_seq == 3


@pytest.mark.parametrize("branch", WAIT_BRANCHES)
def test_a_server_waits_for_the_next_call_whichever_way_the_channel_waits(branch: str) -> None:
    """recv() is the second half of an exchange (Ring.exchange of no frame): frames already
    there, frames that come while it waits and frames in fragments arrive whole and in order,
    and nothing of ours is sent meanwhile."""
    large = bytes(range(256)) * (3 * shm.DEFAULT_CAPACITY // 256)  # three fragments and more
    with channel_pair(branch) as (server, caller, deadline):
        caller.send(b"call 0")
        assert server.recv(deadline) == b"call 0"
        late = threading.Timer(0.05, caller.send, (b"call 1",))
        late.start()
        assert server.recv(deadline) == b"call 1"
        late.join()
        sender = threading.Thread(target=caller.send, args=(large,))
        sender.start()
        assert server.recv(deadline) == large
        sender.join()
        assert server._out_seq == 0 and server._in_seq == caller._out_seq
