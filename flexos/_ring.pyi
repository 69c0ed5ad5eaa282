"""The hot path of a shared-memory channel between two processes (flexos/_ring.c)."""

import mmap

ARRIVED: int
CLOSED: int
GONE: int
AGAIN: int
MISSED: int
NEEDS_CPU: int

class Ring:
    """Holds a writable export of ``memory`` until :meth:`release`; every offset is checked."""

    def __init__(self, memory: mmap.mmap, /) -> None: ...
    def publish(
        self, payload_off: int, frame: bytes | memoryview, hdr_off: int, flags: int, seq: int, peer_sleep_off: int, /
    ) -> bool:
        """Copy ``frame`` in, store its length and flags, then ``seq`` (release), fence; the peer sleeps?"""

    def spin(self, offset: int, value: int, budget_ns: int, /) -> int:
        """Poll the u64 at ``offset`` until it is ``value``: the ns it took; past the budget,
        MISSED, or NEEDS_CPU if we were preempted meanwhile."""

    def park(
        self,
        sleep_off: int,
        offset: int,
        value: int,
        closed_off: int,
        efd: int,
        watch_fd: int,
        watch_events: int,
        timeout_ms: int,
        /,
    ) -> int:
        """Flag ourselves sleeping, look again, poll: ARRIVED, CLOSED, GONE or AGAIN."""

    def release(self) -> None:
        """Let go of the memory (before its mmap is closed)."""
