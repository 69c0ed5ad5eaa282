"""flexos/_ring.c, the shared-memory channel's hot path: what it stores, how it waits, and that no
offset reaches outside its memory."""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from flexos._ring import (
    AGAIN,
    ARRIVED,
    CLOSED,
    GONE,
    MISSED,
    NEEDS_CPU,
    NOT_SPUN,
    PARKED_AGAIN,
    PEER_CLOSED,
    PEER_GONE,
    Ring,
    hold_spin,
    spinners,
)

SLEEP, CLOSED_FLAG, PEER_SLEEP, HEADER, PAYLOAD = 0, 4, 64, 128, 256


@pytest.fixture
def memory() -> mmap.mmap:
    return mmap.mmap(-1, 4096)


@pytest.fixture
def fds() -> Iterator[tuple[int, int, int]]:
    """An eventfd to park on, and a pipe whose read end stands for the peer's watch fd."""
    efd, watch_r, watch_w = os.eventfd(0, os.EFD_NONBLOCK), *os.pipe()
    yield efd, watch_r, watch_w
    for fd in (efd, watch_r, watch_w):
        os.close(fd)


def test_publish_stores_the_frame_then_its_header_and_reports_a_sleeping_peer(memory: mmap.mmap) -> None:
    ring = Ring(memory)
    assert ring.publish(PAYLOAD, b"hello", HEADER, 1, 7, PEER_SLEEP) is False
    assert memory[PAYLOAD : PAYLOAD + 5] == b"hello"
    assert struct.unpack_from("<IIQ", memory, HEADER) == (5, 1, 7)
    struct.pack_into("<I", memory, PEER_SLEEP, 1)
    assert ring.publish(PAYLOAD, memoryview(b"xy"), HEADER, 0, 8, PEER_SLEEP) is True
    assert struct.unpack_from("<IIQ", memory, HEADER) == (2, 0, 8)


def test_spin_returns_how_long_it_took_or_minus_one(memory: mmap.mmap) -> None:
    ring = Ring(memory)
    assert ring.spin(HEADER + 8, 1, 1_000_000) in (MISSED, NEEDS_CPU)  # nothing there: 1 ms
    struct.pack_into("<Q", memory, HEADER + 8, 1)
    assert 0 <= ring.spin(HEADER + 8, 1, 1_000_000) < 1_000_000


def test_a_spin_that_was_preempted_says_the_cpu_is_needed(memory: mmap.mmap) -> None:
    """A CPU-bound process confined to our CPU takes its turn within the spin's 300 ms."""
    ring = Ring(memory)
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # it inherits our one CPU
    try:
        time.sleep(0.1)  # the hog is running
        assert ring.spin(HEADER + 8, 1, 300_000_000) == NEEDS_CPU
    finally:
        os.sched_setaffinity(0, cpus)
        hog.kill()
        hog.wait()


def test_spin_sees_a_store_from_another_thread(memory: mmap.mmap) -> None:
    ring = Ring(memory)
    writer = threading.Timer(0.01, lambda: struct.pack_into("<Q", memory, HEADER + 8, 3))
    writer.start()
    took = -1
    while took < 0:  # the spin holds the GIL: the writer runs between spins
        took = ring.spin(HEADER + 8, 3, 100_000)
    writer.join()


def test_park_arrives_on_a_wake_up_and_clears_its_flag(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    ring = Ring(memory)
    efd, watch_r, _ = fds

    def peer() -> None:
        time.sleep(0.02)
        assert struct.unpack_from("<I", memory, SLEEP)[0] == 1  # it said it sleeps
        struct.pack_into("<Q", memory, HEADER + 8, 5)
        os.eventfd_write(efd, 1)

    thread = threading.Thread(target=peer)
    thread.start()
    status = AGAIN
    while status == AGAIN:
        status = ring.park(SLEEP, HEADER + 8, 5, CLOSED_FLAG, efd, watch_r, select.POLLIN, 1000)
    thread.join()
    assert status == ARRIVED and struct.unpack_from("<I", memory, SLEEP)[0] == 0
    with pytest.raises(BlockingIOError):  # the wake-up was consumed
        os.eventfd_read(efd)


def test_park_reports_a_closed_peer_a_dead_peer_and_a_timeout(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    ring = Ring(memory)
    efd, watch_r, watch_w = fds
    assert ring.park(SLEEP, HEADER + 8, 9, CLOSED_FLAG, efd, watch_r, select.POLLIN, 10) == AGAIN
    os.write(watch_w, b"x")  # the watch fd fires: the peer is gone
    assert ring.park(SLEEP, HEADER + 8, 9, CLOSED_FLAG, efd, watch_r, select.POLLIN, 1000) == GONE
    struct.pack_into("<I", memory, CLOSED_FLAG, 1)
    assert ring.park(SLEEP, HEADER + 8, 9, CLOSED_FLAG, efd, watch_r, select.POLLIN, 1000) == CLOSED
    assert struct.unpack_from("<I", memory, SLEEP)[0] == 0


def close_soon(ring: Ring, memory: mmap.mmap) -> threading.Thread:
    """Another thread that, in 50 ms, releases the ring and unmaps its memory (a store into it
    after that would crash the process)."""

    def close_it() -> None:
        time.sleep(0.05)
        ring.release()
        memory.close()

    closer = threading.Thread(target=close_it)
    closer.start()
    return closer


def test_a_ring_released_and_unmapped_during_a_park_is_not_touched(
    memory: mmap.mmap, fds: tuple[int, int, int]
) -> None:
    """Another thread closing the channel while we sleep: the park ends as if the peer were gone."""
    ring = Ring(memory)
    efd, watch_r, _ = fds

    closer = close_soon(ring, memory)
    status = ring.park(SLEEP, HEADER + 8, 9, CLOSED_FLAG, efd, watch_r, select.POLLIN, 300)
    closer.join()
    assert status == GONE and memory.closed


def test_a_signal_handler_that_raises_ends_a_park(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    ring = Ring(memory)
    efd, watch_r, _ = fds

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            ring.park(SLEEP, HEADER + 8, 9, CLOSED_FLAG, efd, watch_r, select.POLLIN, 10_000)
        assert time.monotonic() - started < 5  # it did not wait out the 10 s poll
        assert struct.unpack_from("<I", memory, SLEEP)[0] == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.publish(4090, b"too long", HEADER, 0, 1, PEER_SLEEP),
        lambda r: r.publish(-1, b"x", HEADER, 0, 1, PEER_SLEEP),
        lambda r: r.publish(PAYLOAD, b"x", 4090, 0, 1, PEER_SLEEP),
        lambda r: r.publish(PAYLOAD, b"x", HEADER + 4, 0, 1, PEER_SLEEP),  # a misaligned header
        lambda r: r.publish(PAYLOAD, b"x", HEADER, 0, 1, 4094),
        lambda r: r.publish(PAYLOAD, b"x", HEADER, 1 << 32, 1, PEER_SLEEP),
        lambda r: r.spin(4092, 1, 10),
        lambda r: r.spin(1 << 40, 1, 10),
        lambda r: r.park(4093, HEADER + 8, 1, CLOSED_FLAG, -1, -1, 0, 0),
    ],
    ids=[
        "payload-past-end",
        "negative",
        "header-past-end",
        "misaligned",
        "flag-past-end",
        "flags",
        "spin",
        "far",
        "park",
    ],
)
def test_no_offset_reaches_outside_the_memory(memory: mmap.mmap, call) -> None:
    before = bytes(memory)
    with pytest.raises((ValueError, OverflowError)):
        call(Ring(memory))
    assert bytes(memory) == before


def test_a_released_ring_refuses_and_frees_its_memory(memory: mmap.mmap) -> None:
    ring = Ring(memory)
    with pytest.raises(BufferError):  # held: the mapping cannot be closed under it
        memory.close()
    ring.release()
    with pytest.raises(ValueError, match="released"):
        ring.spin(HEADER + 8, 1, 10)
    memory.close()


def test_read_only_memory_is_refused() -> None:
    with pytest.raises(BufferError):
        Ring(b"\0" * 4096)


# -- exchange(): one side's whole round trip, routed once ------------------------------------------
# A 4096-byte region as shm.py lays one out with a capacity of 1024: side 0's view of it.
CAPACITY = 1024
OUT_HDR, IN_HDR, OUT_PAYLOAD, IN_PAYLOAD = 128, 192, 256, 256 + CAPACITY
MY_SLEEP, MY_CLOSED, THEIR_SLEEP, THEIR_CLOSED = 0, 4, 64, 68


def routed(
    memory: mmap.mmap, fds: tuple[int, int, int], fast_limit: int = CAPACITY, hand_over: bool = False
) -> tuple[Ring, int]:
    """Side 0's Ring, with an eventfd of its own to park on and one that stands for the peer's."""
    efd, watch_r, _ = fds
    peer_efd = os.eventfd(0, os.EFD_NONBLOCK)
    ring = Ring(memory)
    ring.route(
        OUT_PAYLOAD, OUT_HDR, IN_PAYLOAD, IN_HDR, THEIR_SLEEP, MY_SLEEP, THEIR_CLOSED, peer_efd, efd,
        watch_r, select.POLLIN, fast_limit, CAPACITY, hand_over,
    )  # fmt: skip
    return ring, peer_efd


def answer(memory: mmap.mmap, frame: bytes, seq: int, flags: int = 0) -> None:
    """What the peer does: its frame into our payload, then its header, seq last."""
    memory[IN_PAYLOAD : IN_PAYLOAD + len(frame)] = frame
    struct.pack_into("<IIQ", memory, IN_HDR, len(frame), flags, seq)


def test_exchange_publishes_and_takes_a_reply_already_there(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    ring, peer_efd = routed(memory, fds)
    answer(memory, b"pong", 1)
    assert ring.exchange(b"ping", 0, 0) == b"pong"
    assert memory[OUT_PAYLOAD : OUT_PAYLOAD + 4] == b"ping"
    assert struct.unpack_from("<IIQ", memory, OUT_HDR) == (4, 0, 1)
    assert struct.unpack_from("<Q", memory, IN_HDR + 16)[0] == 1  # acknowledged: we picked it up
    assert (ring.out_seq, ring.in_seq, ring.spun) == (1, 1, 0)  # taken without a spin
    ring.out_seq, ring.in_seq = 41, 6  # the channel's own numbering, which the Ring continues
    answer(memory, b"again", 7)
    assert ring.exchange(b"ping", 0, 0) == b"again"
    assert struct.unpack_from("<IIQ", memory, OUT_HDR) == (4, 0, 42) and ring.in_seq == 7
    with pytest.raises(BlockingIOError):  # the peer was awake: no wake-up was written
        os.eventfd_read(peer_efd)
    os.close(peer_efd)


def test_exchange_of_none_publishes_nothing_and_takes_or_waits_for_the_next_frame(
    memory: mmap.mmap, fds: tuple[int, int, int]
) -> None:
    """The second half of a round trip alone (a server that already sent its reply): no frame,
    header or wake-up of ours, even with the peer asleep; the peer's next frame taken as ever."""
    efd, _watch_r, _watch_w = fds
    ring, peer_efd = routed(memory, fds)
    struct.pack_into("<I", memory, THEIR_SLEEP, 1)
    assert ring.exchange(None, 0, 0) == NOT_SPUN
    answer(memory, b"call", 1)
    assert ring.exchange(None, 0, 0) == b"call"
    assert struct.unpack_from("<IIQ", memory, OUT_HDR) == (0, 0, 0) and memory[OUT_PAYLOAD] == 0
    assert (ring.out_seq, ring.in_seq) == (0, 1)
    assert struct.unpack_from("<Q", memory, IN_HDR + 16)[0] == 1

    def call_and_wake() -> None:
        answer(memory, b"next", 2)
        os.eventfd_write(efd, 1)

    threading.Timer(0.05, call_and_wake).start()
    assert ring.exchange(None, 0, 5000) == b"next"  # parked until the peer's frame came
    assert ring.exchange(None, 1_000_000, 0) in (MISSED, NEEDS_CPU)  # spun 1 ms: nothing came
    with pytest.raises(BlockingIOError):
        os.eventfd_read(peer_efd)
    os.close(peer_efd)


def test_exchange_wakes_a_sleeping_peer_and_says_when_it_neither_spun_nor_parked(
    memory: mmap.mmap, fds: tuple[int, int, int]
) -> None:
    ring, peer_efd = routed(memory, fds)
    struct.pack_into("<I", memory, THEIR_SLEEP, 1)
    assert ring.exchange(b"ping", 0, 0) == NOT_SPUN
    assert os.eventfd_read(peer_efd) == 1
    assert struct.unpack_from("<Q", memory, IN_HDR + 16)[0] == 0  # nothing was taken
    assert (ring.out_seq, ring.in_seq) == (1, 0)
    os.close(peer_efd)


def test_exchange_spins_for_the_reply_or_reports_the_miss(tmp_path, fds: tuple[int, int, int]) -> None:
    shared = tmp_path / "ring"
    shared.write_bytes(bytes(4096))
    with open(shared, "r+b") as file:
        memory = mmap.mmap(file.fileno(), 4096)
    ring, peer_efd = routed(memory, fds)
    assert ring.exchange(b"ping", 1_000_000, 0) in (MISSED, NEEDS_CPU)
    assert spinners() == 0  # the spin is over, and counted no more
    assert (ring.out_seq, ring.in_seq, ring.spun) == (1, 0, 0)
    ring.suspicions = 2  # the policy's count (shm.py), which a spin that ends well clears
    # The peer: another process (a thread would need the GIL the spin holds), answering in 10 ms.
    peer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import mmap, struct, time
        with open({str(shared)!r}, "r+b") as file:
            memory = mmap.mmap(file.fileno(), 4096)
        time.sleep(0.01)
        memory[{IN_PAYLOAD}:{IN_PAYLOAD + 4}] = b"late"
        struct.pack_into("<IIQ", memory, {IN_HDR}, 4, 0, 1)
    """)])  # fmt: skip
    got = ring.exchange(b"ping", 5_000_000_000, 0)
    assert peer.wait(10) == 0
    # at most a few hundred ms of a 5 s budget: taken (one over half the budget is left to the caller)
    assert got == b"late"
    assert (ring.out_seq, ring.in_seq, ring.spun, ring.suspicions) == (2, 1, 1, 0)
    assert ring.exchange(b"ping", 1_000_000, 0) in (MISSED, NEEDS_CPU)  # seq 2 never comes
    assert (ring.in_seq, ring.spun) == (1, 1)
    ring.release()
    os.close(peer_efd)


def test_exchange_leaves_fragments_and_oversized_frames_to_the_caller(
    memory: mmap.mmap, fds: tuple[int, int, int]
) -> None:
    """A hostile peer's header (more fragments, or a length past the bound) is never taken here:
    the caller's recv() checks it whole (and refuses a corrupt one)."""
    ring, peer_efd = routed(memory, fds, fast_limit=16)
    answer(memory, b"part", 1, flags=1)
    assert ring.exchange(b"a", 0, 0) == 0  # arrived, not spun for, not taken
    assert ring.in_seq == 0
    ring.in_seq = 1  # as the caller's recv() would, taking it
    answer(memory, b"x" * 17, 2)
    assert ring.exchange(b"b", 0, 0) == 0
    ring.in_seq = 2
    struct.pack_into("<IIQ", memory, IN_HDR, 0xFFFFFFFF, 0, 3)  # a length far past the memory
    assert ring.exchange(b"c", 0, 0) == 0
    assert struct.unpack_from("<Q", memory, IN_HDR + 16)[0] == 0 and ring.in_seq == 2
    os.close(peer_efd)


@pytest.mark.parametrize("hand_over", [False, True])
def test_exchange_parks_until_woken_or_told_the_peer_closed(
    memory: mmap.mmap, fds: tuple[int, int, int], hand_over: bool
) -> None:
    """With ``hand_over`` (the peer shares our one CPU) a park that woke the peer yields to it
    first: the outcomes are the same."""
    efd, _watch_r, watch_w = fds
    ring, peer_efd = routed(memory, fds, hand_over=hand_over)
    struct.pack_into("<I", memory, THEIR_SLEEP, 1)  # the peer sleeps: every exchange wakes it

    def reply_and_wake() -> None:
        answer(memory, b"woken", 1)
        os.eventfd_write(efd, 1)

    threading.Timer(0.05, reply_and_wake).start()
    assert ring.exchange(b"ping", 0, 5000) == b"woken"
    assert struct.unpack_from("<I", memory, MY_SLEEP)[0] == 0
    assert ring.exchange(b"ping", 0, 10) == PARKED_AGAIN  # nothing within 10 ms
    struct.pack_into("<I", memory, THEIR_CLOSED, 1)
    assert ring.exchange(b"ping", 0, 5000) == PEER_CLOSED
    struct.pack_into("<I", memory, THEIR_CLOSED, 0)
    os.write(watch_w, b"x")  # the peer's watch fd fires: it died
    assert ring.exchange(b"ping", 0, 5000) == PEER_GONE
    assert (ring.out_seq, ring.in_seq) == (4, 1)
    assert os.eventfd_read(peer_efd) == 4  # one wake-up per frame
    os.close(peer_efd)


def test_one_thread_spins_at_a_time(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    """While another thread of this process spins (it holds its GIL), exchange() does not spin."""
    ring, peer_efd = routed(memory, fds)
    assert hold_spin(1) == 1
    try:
        assert ring.exchange(b"ping", 1_000_000_000, 0) == NOT_SPUN
    finally:
        assert hold_spin(-1) == 0
    with pytest.raises(ValueError):
        hold_spin(2)
    os.close(peer_efd)


@pytest.mark.parametrize("hand_over", [False, True])
def test_a_ring_released_and_unmapped_during_an_exchange_is_not_touched(
    memory: mmap.mmap, fds: tuple[int, int, int], hand_over: bool
) -> None:
    """Another thread closing the channel while an exchange hands the CPU over or sleeps: it ends
    as if the peer were gone, without a store into the unmapped memory."""
    ring, peer_efd = routed(memory, fds, hand_over=hand_over)
    struct.pack_into("<I", memory, THEIR_SLEEP, 1)  # the peer sleeps: the exchange wakes it first

    closer = close_soon(ring, memory)
    got = ring.exchange(b"ping", 0, 300)
    closer.join()
    assert got == PEER_GONE and memory.closed
    os.close(peer_efd)


@pytest.mark.parametrize(
    "route",
    [
        (4096 - 100, OUT_HDR, IN_PAYLOAD, IN_HDR, 64, 0, 68),  # a payload that runs past the memory
        (OUT_PAYLOAD, 4090, IN_PAYLOAD, IN_HDR, 64, 0, 68),  # a header past it
        (OUT_PAYLOAD, OUT_HDR, IN_PAYLOAD, 129, 64, 0, 68),  # a misaligned header
        (OUT_PAYLOAD, OUT_HDR, IN_PAYLOAD, IN_HDR, -4, 0, 68),  # a flag before it
    ],
)
def test_a_route_outside_the_memory_is_refused(memory: mmap.mmap, route: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Ring(memory).route(*route, 0, 0, 0, 0, CAPACITY, CAPACITY, False)


def test_a_ring_is_routed_once_and_bounds_what_it_sends(memory: mmap.mmap, fds: tuple[int, int, int]) -> None:
    ring, peer_efd = routed(memory, fds)
    with pytest.raises(TypeError):
        ring.route(OUT_PAYLOAD, OUT_HDR, IN_PAYLOAD, IN_HDR, 64, 0, 68, 0, 0, 0, 0, CAPACITY, CAPACITY, False)
    with pytest.raises(ValueError):
        ring.exchange(b"x" * (CAPACITY + 1), 0, 0)
    assert ring.out_seq == 0  # nothing was sent
    with pytest.raises(ValueError):  # a fast limit over the capacity
        Ring(memory).route(OUT_PAYLOAD, OUT_HDR, IN_PAYLOAD, IN_HDR, 64, 0, 68, 0, 0, 0, 0, CAPACITY + 1, CAPACITY, 0)
    with pytest.raises(ValueError):
        Ring(memory).exchange(b"x", 0, 0)  # not routed
    ring.release()
    with pytest.raises(ValueError):
        ring.exchange(b"x", 0, 0)
    os.close(peer_efd)
