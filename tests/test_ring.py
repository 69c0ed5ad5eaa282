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
import threading
import time
from collections.abc import Iterator

import pytest

from flexos._ring import AGAIN, ARRIVED, CLOSED, GONE, MISSED, NEEDS_CPU, Ring

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


def test_a_ring_released_and_unmapped_during_a_park_is_not_touched(
    memory: mmap.mmap, fds: tuple[int, int, int]
) -> None:
    """Another thread closing the channel while we sleep: the park ends as if the peer were gone."""
    ring = Ring(memory)
    efd, watch_r, _ = fds

    def close_it() -> None:
        time.sleep(0.05)
        ring.release()
        memory.close()  # unmapped: a store into it now would crash the process

    closer = threading.Thread(target=close_it)
    closer.start()
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
