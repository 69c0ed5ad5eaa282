"""The hot path of a shared-memory channel between two processes (flexos/_ring.c)."""

import mmap

ARRIVED: int
CLOSED: int
GONE: int
AGAIN: int
MISSED: int
NEEDS_CPU: int
NOT_SPUN: int
PARKED_AGAIN: int
PEER_CLOSED: int
PEER_GONE: int

def spinners() -> int:
    """Threads of this process spinning now, in every interpreter."""

def hold_spin(delta: int, /) -> int:
    """A spin outside :meth:`Ring.exchange` starts (1) or ends (-1): the count after."""

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

    def route(
        self,
        out_payload: int,
        out_hdr: int,
        in_payload: int,
        in_hdr: int,
        peer_sleep: int,
        my_sleep: int,
        peer_closed: int,
        peer_efd: int,
        my_efd: int,
        watch_fd: int,
        watch_events: int,
        fast_limit: int,
        capacity: int,
        hand_over: bool,
        /,
    ) -> None:
        """This side's offsets and descriptors, checked once, for :meth:`exchange`; ``hand_over``:
        the peer shares our only CPU, so a park after waking it yields the CPU to it once first."""

    out_seq: int
    in_seq: int
    spun: int
    suspicions: int

    def exchange(self, frame: bytes | memoryview | None, budget_ns: int, park_ms: int, /) -> bytes | int:
        """Publish ``frame`` as ``out_seq + 1`` (None: publish nothing), wake a sleeping peer,
        then spin up to ``budget_ns`` (if no other thread spins) or park up to ``park_ms``: the
        reply ``in_seq + 1`` if it came as one fragment within the fast limit (and, spun for, in
        half the budget), counted in ``in_seq`` (and ``spun``); else an outcome: ns (there, not
        taken), MISSED, NEEDS_CPU, NOT_SPUN, PARKED_AGAIN, PEER_CLOSED or PEER_GONE."""

    def release(self) -> None:
        """Let go of the memory (before its mmap is closed)."""
