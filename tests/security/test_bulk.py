"""Large buffers beside the frames, between the app and a ``process`` compartment.

Hostile: the compartment (tests/fixtures/bulkbox.py) forges LOAN records, sends the app
descriptors of its choosing over the port's socket and attacks the arenas it shares with the app.
Each attack costs that one call a clean error (ProtocolError, or ReplyTooLarge past max_reply);
the app's memory is untouched and it keeps working. Fidelity: an honest buffer keeps its type
and contents both ways, copies are the receiver's own, and under the ``view`` strategy a view
is read-only and immutable. Reclamation: arena slots and descriptors come back.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import flexos
from flexos import CompartmentSpec, Image
from flexos.errors import ProtocolError
from flexos.transports import ReplyTooLarge
from flexos.transports.bulk import _UNCLAIMED, DEFAULT_ARENA, BulkPort
from flexos.wire.bulk import THRESHOLD

MiB = 1 << 20
ARENA, SEALED, VIEW = 0, 1, 2
BYTES, BYTEARRAY, MEMORYVIEW = 0, 1, 2
KINDS = {"bytes": bytes, "bytearray": bytearray, "memoryview": memoryview}


class Booted:
    """The gate to ``bulkbox`` in compartment ``box``, and the app's end of its bulk port."""

    def __init__(self, runtime: flexos.Runtime) -> None:
        self.box: Any = importlib.import_module("bulkbox")
        self.box.echo("booted")
        port = runtime.compartments["box"].link().bulk
        assert port is not None
        self.port: BulkPort = port

    def still_works(self) -> None:
        """Small and large calls both ways, contents intact, nothing left in either arena."""
        assert self.box.echo("still serving") == "still serving"
        data = bytes(range(256)) * (MiB // 256)
        assert self.box.echo(data) == data
        assert bytes(self.box.make("bytes", MiB, 0x33)) == b"\x33" * MiB
        assert self.port.arena_in_use() == 0
        assert self.box.arena_in_use() == 0


@pytest.fixture
def boot_bulkbox() -> Iterator[Callable[..., Booted]]:
    """Boot ``bulkbox`` in process compartment ``box`` (``buffers``: its sharing strategy)."""
    runtimes: list[flexos.Runtime] = []

    def _boot(*, buffers: str = "copy", max_reply: int = 64 * MiB) -> Booted:
        sys.modules.pop("bulkbox", None)
        image = Image(
            {
                "app": CompartmentSpec("app", "fcalls", default=True),
                "box": CompartmentSpec("box", "process", max_reply=max_reply),
            },
            {"bulkbox": "box"},
            source="<tests/security/test_bulk>",
            library_sharing={"bulkbox": {"buffers": buffers}},
        )
        runtime = flexos.boot(image)
        runtimes.append(runtime)
        return Booted(runtime)

    yield _boot
    for runtime in runtimes:
        runtime.stop()
    sys.modules.pop("bulkbox", None)


@pytest.fixture
def booted(boot_bulkbox: Callable[..., Booted]) -> Booted:
    return boot_bulkbox()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _digest(value: Any) -> str:
    return hashlib.sha256(bytes(value)).hexdigest()


# -- hostile: forged LOAN records -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "length"),
    [
        (DEFAULT_ARENA, 1),  # just past the end
        (DEFAULT_ARENA - 4096, 8192),  # overlapping the end
        (0, DEFAULT_ARENA + 1),
        (2**64 - 1, 1),  # what a negative offset is, unsigned
        (1, 2**64 - 1),  # what a negative length is, unsigned: where + length wraps to 0
        (2**63, 2**63),
    ],
)
def test_an_arena_loan_outside_the_arena_is_refused(booted: Booted, where: int, length: int) -> None:
    before = booted.box.make("bytearray", MiB, 0x77)  # received earlier, through the same arena
    with pytest.raises(ProtocolError, match="outside the 268435456-byte arena"):
        booted.box.lend_record(BYTES, ARENA, where, length)
    assert before == b"\x77" * MiB
    booted.still_works()


def test_an_arena_loan_up_to_the_very_end_is_honoured(booted: Booted) -> None:
    """The bound is exact: the last byte of the arena is in it (the compartment filled it)."""
    booted.box.scribble_own_arena(0x42)
    assert booted.box.lend_record(BYTES, ARENA, DEFAULT_ARENA - 8192, 8192) == b"\x42" * 8192
    assert booted.box.lend_record(BYTES, ARENA, DEFAULT_ARENA, 0) == b""


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (bytes(23), "malformed buffer loan"),
        (bytes(25), "buffer loan has trailing bytes"),
        (b"", "malformed buffer loan"),
        (bytes([3]) + bytes(23), "unknown kind 3"),
        (bytes([255]) + bytes(23), "unknown kind 255"),
        (bytes([0, 4]) + bytes(22), "unknown placement 4"),
        # ARENA_VIEW: only the app's arena, which the compartment cannot write, is viewed in place
        (bytes([0, 3]) + bytes(22), "lent a buffer to be viewed in an arena it can write"),
    ],
    ids=["short", "trailing", "empty", "kind-3", "kind-255", "placement-4", "arena-view-from-compartment"],
)
def test_a_malformed_loan_record_is_refused(booted: Booted, payload: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        booted.box.lend_raw(payload)
    booted.still_works()


@pytest.mark.parametrize(
    ("tail", "error"),
    [
        (b"", "malformed memoryview loan"),
        (b"B\x01", "malformed memoryview loan"),  # one dimension announced, none sent
        (b"x\x01" + (4096).to_bytes(8, "little"), "bad format"),
        (b"B\x00", "bad shape"),
        (b"B\x41" + (1).to_bytes(8, "little") * 65, "bad shape"),  # 65 dimensions
        (b"B\x01" + (4097).to_bytes(8, "little"), "do not match"),
        (b"d\x01" + (4096).to_bytes(8, "little"), "do not match"),  # 8 bytes an item
        (b"B\x02" + (2**63).to_bytes(8, "little") * 2, "do not match"),
    ],
    ids=["none", "truncated", "format", "no-dimension", "65-dimensions", "length", "itemsize", "huge"],
)
def test_a_memoryview_loan_with_a_lying_shape_is_refused(booted: Booted, tail: bytes, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        booted.box.lend_record(MEMORYVIEW, ARENA, 0, 4096, tail)
    booted.still_works()


def test_a_memoryview_loan_with_a_zero_dimension_is_refused(booted: Booted) -> None:
    """0 x 2^63 items describe 0 bytes, but memoryview cannot take such a shape: still a ProtocolError."""
    tail = b"B\x02" + (0).to_bytes(8, "little") + (2**63).to_bytes(8, "little")
    with pytest.raises(ProtocolError):
        booted.box.lend_record(MEMORYVIEW, ARENA, 0, 0, tail)
    booted.still_works()


def test_a_sealed_buffer_never_sent_is_refused(booted: Booted) -> None:
    with pytest.raises(ProtocolError, match="sealed buffer 424242, whose descriptor it never sent"):
        booted.box.lend_record(BYTES, SEALED, 424242, 4096)
    with pytest.raises(ProtocolError, match="never sent"):
        booted.box.lend_record(BYTEARRAY, VIEW, 7, 4096)
    booted.still_works()


def test_a_sealed_loan_over_max_reply_is_refused_before_its_descriptor_is_looked_for(booted: Booted) -> None:
    with pytest.raises(ReplyTooLarge, match=r"compartment 'box': .*max_reply of 67108864 bytes"):
        booted.box.lend_record(BYTES, SEALED, 1, 2**63)
    booted.still_works()


def test_a_forged_reply_to_a_large_argument_leaves_no_slot_taken(booted: Booted) -> None:
    """The app lent its argument, the reply was a lie: the slot is free anyway."""
    with pytest.raises(ProtocolError):
        booted.box.lend_record(BYTES, SEALED, 99, 1, b"", argument=b"\x01" * (8 * MiB))
    assert booted.port.arena_in_use() == 0
    booted.still_works()


# -- hostile: descriptors sent beside the frames --------------------------------------------------


@pytest.mark.parametrize(
    ("what", "error"),
    [
        ("unsealed", "lent buffer memfd is not sealed"),
        ("no-write-seal", "lent buffer memfd is not sealed"),
        ("no-shrink-seal", "lent buffer memfd is not sealed"),
        ("future-write-with-mapping", "lent buffer memfd is not sealed"),
        ("wrong-length", "holds 65537 bytes, not the 65536 agreed"),
        ("pipe", "lent buffer descriptor is not a memfd"),
        ("file", "lent buffer descriptor is not a memfd|is not sealed"),
        ("socket", "lent buffer descriptor is not a memfd"),
    ],
)
@pytest.mark.parametrize("buffers", ["copy", "view"])
def test_a_descriptor_that_is_no_sealed_buffer_is_refused(
    boot_bulkbox: Callable[..., Booted], buffers: str, what: str, error: str
) -> None:
    """A writable memfd would let the compartment change bytes after the app checked them; under
    ``view`` the app would even map them. The attacker changes them after sending: too late."""
    booted = boot_bulkbox(buffers=buffers)
    fds = _open_fds()
    placement = VIEW if buffers == "view" else SEALED
    with pytest.raises(ProtocolError, match=error):
        booted.box.lend_descriptor(what, 17, THRESHOLD, placement)
    assert booted.port.unclaimed() == 0
    booted.still_works()
    assert _open_fds() <= fds  # the refused descriptor was closed


def test_an_honest_sealed_buffer_from_the_attacker_is_taken_exactly(booted: Booted) -> None:
    """The same path, sealed as required: the app gets those bytes (a control for the refusals)."""
    assert booted.box.lend_descriptor("sealed", 17, THRESHOLD) == b"\xa5" * THRESHOLD
    assert booted.port.unclaimed() == 0


@pytest.mark.parametrize("how", ["no-descriptor", "two-descriptors", "long-message"])
def test_a_malformed_transfer_message_is_refused_and_its_descriptors_closed(booted: Booted, how: str) -> None:
    fds = _open_fds()
    with pytest.raises(ProtocolError, match="malformed buffer transfer message"):
        booted.box.send_malformed_transfer(how)
    assert booted.port.unclaimed() == 0
    booted.still_works()
    assert _open_fds() <= fds


def test_descriptors_never_named_are_bounded(booted: Booted) -> None:
    """Transfers the compartment sends and never names: the app holds _UNCLAIMED at most, then
    refuses the call; its own calls go on (this compartment has spoilt only its own sealed path)."""
    fds = _open_fds()
    with pytest.raises(ProtocolError, match="peer sent descriptors of buffers it never named"):
        booted.box.flood_descriptors(_UNCLAIMED + 20, 5)
    assert booted.port.unclaimed() == _UNCLAIMED
    assert _open_fds() - fds <= _UNCLAIMED + 4  # the held ones, and a channel's
    booted.still_works()


# -- hostile: the shared arenas --------------------------------------------------------------------


def test_the_compartment_cannot_write_grow_or_shrink_the_apps_arena(booted: Booted) -> None:
    """Its descriptor is read-only, and the arena is sealed against writes and new writable
    mappings: reopening the descriptor read-write through /proc/self/fd gains nothing."""
    outcomes = booted.box.attack_arena("flexos-arena-app")
    assert outcomes.pop("size") == "unchanged"
    outcomes.pop("reopen")  # a memfd can be reopened; what matters is what the new descriptor may do
    assert outcomes and all(how != "done" for how in outcomes.values()), outcomes
    assert outcomes["mmap-write"] == "PermissionError"
    booted.still_works()


def test_the_compartment_cannot_grow_or_shrink_its_own_arena(booted: Booted) -> None:
    """The app reads that arena: shrunk under a read, it would be a SIGBUS in the app."""
    outcomes = booted.box.attack_arena("flexos-arena-compartment")
    assert outcomes["size"] == "unchanged"
    for how in ("shrink", "grow", "reopened-shrink", "reopened-grow"):
        assert outcomes[how] == "PermissionError", outcomes
    booted.still_works()


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_app_received_is_its_own_copy(booted: Booted, kind: str) -> None:
    """The compartment rewrites the arena its reply came through: the app's value stays."""
    received = booted.box.make(kind, 4 * MiB, 0x5A)
    assert type(received) is KINDS[kind]
    booted.box.scribble_own_arena(0xEE)
    assert bytes(received) == b"\x5a" * (4 * MiB)


# -- fidelity ------------------------------------------------------------------------------------

SIZES = [THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, THRESHOLD + 4096, 5 * MiB]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_each_direction_keeps_type_and_contents(booted: Booted, kind: str, size: int) -> None:
    data = KINDS[kind](bytes(range(251)) * (size // 251) + b"y" * (size % 251))
    arrived = booted.box.describe(data)
    assert arrived[:3] == [kind, size, _digest(data)]
    if kind == "memoryview":
        assert arrived[3:] == [True, "B", [size]]
    back = booted.box.make(kind, size, 0x61)
    assert type(back) is KINDS[kind] and bytes(back) == b"a" * size
    assert booted.port.arena_in_use() == 0


@pytest.mark.parametrize(
    "view",
    [
        memoryview(array("d", range(THRESHOLD // 8))),
        memoryview(array("i", range(3 * THRESHOLD // 4))),
        memoryview(bytes(range(256)) * 1024).cast("i", [256, 256]),
        memoryview(bytes(range(256)) * 1024).cast("H", [16, 16, 512]),
        memoryview(bytearray(b"\x01" * (2 * THRESHOLD))).cast("?"),
    ],
    ids=["doubles", "ints", "ints-2d", "shorts-3d", "bools"],
)
def test_a_shaped_memoryview_keeps_its_format_and_shape(booted: Booted, view: memoryview) -> None:
    back = booted.box.echo(view)
    assert type(back) is memoryview and back.readonly
    assert (back.format, back.shape, back.tolist()) == (view.format, view.shape, view.tolist())
    assert booted.box.describe(view)[3:] == [True, view.format, list(view.shape)]


def test_a_memoryview_of_another_format_arrives_as_its_bytes(booted: Booted) -> None:
    """Struct formats beyond native single characters cross as unsigned bytes (wire/bulk.py)."""
    ints = (ctypes.c_int32 * THRESHOLD)(*range(THRESHOLD))
    view = memoryview(ints)
    assert view.format == "<i"
    back = booted.box.echo(view)
    assert (back.format, back.shape, back.tobytes()) == ("B", (view.nbytes,), view.tobytes())


@pytest.mark.parametrize("kind", ["bytearray", "memoryview"])
def test_a_buffer_larger_than_the_arena_crosses_sealed(boot_bulkbox: Callable[..., Booted], kind: str) -> None:
    booted = boot_bulkbox(max_reply=DEFAULT_ARENA + 8 * MiB)
    size = DEFAULT_ARENA + 4096
    data = KINDS[kind](b"\x3c" * size)
    fds = _open_fds()
    back = booted.box.echo(data)
    assert type(back) is KINDS[kind] and len(back) == size and bytes(back) == bytes(data)
    del back
    assert booted.port.unclaimed() == 0 and booted.box.unclaimed() == 0
    assert booted.port.arena_in_use() == 0
    assert _open_fds() <= fds


def test_a_received_bytearray_is_the_receivers_own(booted: Booted) -> None:
    mine = bytearray(b"\x10" * MiB)
    index = booted.box.keep(mine)
    assert booted.box.mutate_kept(index) == MiB
    assert mine == b"\x10" * MiB
    index, theirs = booted.box.make_and_keep("bytearray", MiB, 0x20)
    assert type(theirs) is bytearray
    theirs[:] = b"\x00" * MiB
    assert booted.box.kept_digest(index) == _digest(b"\x20" * MiB)


def test_under_view_a_buffer_arrives_as_a_read_only_view_the_sender_cannot_change(
    boot_bulkbox: Callable[..., Booted],
) -> None:
    booted = boot_bulkbox(buffers="view")
    mine = bytearray(b"\x10" * MiB)
    index = booted.box.keep(mine)
    assert booted.box.describe(mine)[:4] == ["memoryview", MiB, _digest(mine), True]
    mine[:] = b"\x99" * MiB  # after the call: what the compartment holds is what it was lent
    assert booted.box.kept_digest(index) == _digest(b"\x10" * MiB)

    index, viewed = booted.box.make_and_keep("bytearray", MiB, 0x20)
    assert type(viewed) is memoryview and viewed.readonly
    with pytest.raises(TypeError):
        viewed[0] = 0
    assert booted.box.mutate_kept(index) == MiB  # the compartment changes its original
    assert bytes(viewed) == b"\x20" * MiB


def test_under_view_what_the_compartment_keeps_is_the_apps_arena_untouched_until_it_lets_go(
    boot_bulkbox: Callable[..., Booted],
) -> None:
    """Zero-copy in: the compartment views the app's arena in place. Many later transfers both ways
    never reuse a slot it still views; once it drops its views the app's arena is empty again."""
    booted = boot_bulkbox(buffers="view")
    indices = [booted.box.keep(bytes([i]) * MiB) for i in range(20)]
    for i in range(20):
        assert bytes(booted.box.echo(bytes([100 + i]) * MiB)) == bytes([100 + i]) * MiB
    assert [booted.box.kept_digest(index) for index in indices] == [_digest(bytes([i]) * MiB) for i in range(20)]
    assert booted.port.arena_in_use() == 20 * MiB
    booted.box.forget()
    booted.box.echo("the views are dropped before this call is served")
    assert booted.port.arena_in_use() == 0
    booted.still_works()


def test_a_forged_release_costs_the_compartment_its_views_in_place(boot_bulkbox: Callable[..., Booted]) -> None:
    """The compartment says a slot it still views (or one never lent) is free: the app's next
    large call is a ProtocolError, the app lends it nothing in place again (copies instead, which
    need no word of its), and what the compartment keeps is still what it was lent."""
    booted = boot_bulkbox(buffers="view")
    index = booted.box.keep(b"\x01" * MiB)
    assert booted.box.forge_release([0, 123 << 12]) == "sent"
    with pytest.raises(ProtocolError, match="released a buffer it was not lent"):
        booted.box.echo(b"\x02" * MiB)
    assert booted.box.kept_digest(index) == _digest(b"\x01" * MiB)
    assert booted.box.describe(b"\x03" * MiB)[:4] == ["memoryview", MiB, _digest(b"\x03" * MiB), True]
    booted.box.forget()  # the slot it really views comes back when it lets go, as before
    booted.box.echo("the views are dropped before this call is served")
    booted.still_works()


# -- reclamation ---------------------------------------------------------------------------------


def test_many_large_calls_leave_both_arenas_empty(booted: Booted) -> None:
    data = b"\x44" * (3 * MiB)
    for _ in range(40):
        assert booted.box.echo(data) == data
        assert booted.port.arena_in_use() == 0
    assert booted.box.arena_in_use() == 0


def test_a_call_that_raised_mid_way_leaves_both_arenas_empty(booted: Booted) -> None:
    with pytest.raises(ValueError) as raised:
        booted.box.raise_after(b"\x01" * MiB, 2 * MiB)
    assert raised.value.args == (bytes(2 * MiB), MiB)
    assert booted.port.arena_in_use() == 0

    def fails_on_the_third(buffer: bytes) -> bytes:
        calls.append(len(buffer))
        if len(calls) == 3:
            raise RuntimeError("the app's callback failed")
        return buffer

    calls: list[int] = []
    with pytest.raises(RuntimeError, match="the app's callback failed"):
        booted.box.call_back(fails_on_the_third, MiB, 10)
    assert calls == [MiB] * 3
    assert booted.port.arena_in_use() == 0
    assert booted.box.arena_in_use() == 0
    booted.still_works()


def test_a_callback_heavy_call_leaves_both_arenas_empty(booted: Booted) -> None:
    assert booted.box.call_back(lambda buffer: buffer + b"!", MiB, 50) == 50 * (MiB + 1)
    assert booted.port.arena_in_use() == 0
    assert booted.box.arena_in_use() == 0


def test_the_sealed_path_leaves_no_descriptor_open(boot_bulkbox: Callable[..., Booted]) -> None:
    """Under ``view`` every large buffer crosses as a sealed memfd: none stays open on either side,
    not even while the views are kept (a mapping needs no descriptor; before Python 3.13 mmap keeps
    one per view until it is dropped)."""
    booted = boot_bulkbox(buffers="view")
    booted.box.echo(b"\x01" * MiB)
    fds = _open_fds()
    kept = [booted.box.echo(bytes([i]) * MiB) for i in range(30)]
    assert [bytes(view[:1]) for view in kept] == [bytes([i]) for i in range(30)]
    assert _open_fds() <= fds + (0 if sys.version_info >= (3, 13) else len(kept))
    del kept
    assert booted.box.forget() == 0
    assert _open_fds() <= fds
    assert booted.port.unclaimed() == 0 and booted.box.unclaimed() == 0


def test_a_call_made_while_releasing_does_not_free_the_reply_being_read(booted: Booted) -> None:
    """The app serves a compartment's call, sends a large reply, then applies the releases that came
    with the call; an object freed then calls the compartment on a channel of its own. That call's
    answer proves nothing about the reply on the first channel: its slot stays taken until that
    channel's next frame, or the app could overwrite it while the compartment still copies it out."""
    port, box = booted.port, booted.box
    seen: list[int] = []

    class CallsOnDeath:
        def __del__(self) -> None:
            box.echo("freed")
            seen.append(port.arena_in_use())

    index = box.keep(CallsOnDeath())
    assert box.drop_then_call_back(index, lambda: b"\x66" * (4 * MiB)) == 4 * MiB
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:  # the app's serving thread frees after replying
        time.sleep(0.01)
    assert seen and seen[0] >= 4 * MiB
    assert box.echo("still serving") == "still serving"
    assert bytes(box.make("bytes", MiB, 0x33)) == b"\x33" * MiB
