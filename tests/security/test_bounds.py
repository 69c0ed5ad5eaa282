"""Denial of service: a compartment cannot exhaust the app (issue 12, items 11-14).

The hostile library (tests/fixtures/flooder.py) answers with endless or drip-fed replies, keeps a
call open with callbacks, abandons channels, and saturates the eventfd the app wakes it with.
Each test asserts the bound that stops it (docs/security.md, "Denial-of-service bounds"), who
fails past it (the call, or the compartment, never the app) and that the app keeps working.
"""

from __future__ import annotations

import importlib
import os
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from driver_variants import needs

import flexos
from flexos import CompartmentSpec, Image
from flexos.image import DEFAULT_MAX_REPLY
from flexos.transports import PEER_CHANNELS, ReplyTooLarge

MiB = 1 << 20
VM = pytest.param("vm", marks=[*needs("vm"), pytest.mark.slow])


@pytest.fixture
def boot_flooder() -> Iterator[Callable[..., object]]:
    """Boot ``flooder`` in compartment ``box`` (driver, timeout, max_reply); its module's gate."""
    runtimes: list[flexos.Runtime] = []

    def _boot(driver: str = "process", *, timeout: float | None = None, max_reply: int = DEFAULT_MAX_REPLY) -> object:
        sys.modules.pop("flooder", None)
        box = CompartmentSpec("box", driver, timeout=timeout, max_reply=max_reply)
        image = Image(
            {"app": CompartmentSpec("app", "fcalls", default=True), "box": box},
            {"flooder": "box"},
            source="<tests/security/test_bounds>",
        )
        runtimes.append(flexos.boot(image))
        return importlib.import_module("flooder")

    yield _boot
    for runtime in runtimes:
        runtime.stop()
    sys.modules.pop("flooder", None)


def _serving_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "flexos-serve")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _eventually(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- item 11: what the app accepts per reply ------------------------------------------------------


@pytest.mark.parametrize("driver", ["process", pytest.param("subinterp", marks=needs("subinterp"))])
def test_a_reply_over_max_reply_is_refused_and_the_compartment_keeps_running(boot_flooder, driver) -> None:
    flooder = boot_flooder(driver, max_reply=2 * MiB)
    assert len(flooder.blob(MiB)) == MiB
    with pytest.raises(ReplyTooLarge, match=r"compartment 'box': .*max_reply of 2097152 bytes"):
        flooder.blob(3 * MiB)
    assert flooder.echo("still serving") == "still serving"
    assert len(flooder.blob(MiB)) == MiB


def test_a_callback_over_max_reply_is_refused_too(boot_flooder) -> None:
    """A call the compartment makes into the app is a frame from it like a reply."""
    flooder = boot_flooder("process", max_reply=2 * MiB)
    received: list[int] = []
    assert flooder.call_back_with(lambda data: received.append(len(data)), MiB) is None
    with pytest.raises(ReplyTooLarge, match="compartment 'box'"):
        flooder.call_back_with(lambda data: received.append(len(data)), 3 * MiB)
    assert received == [MiB]
    assert flooder.echo("still serving") == "still serving"


@pytest.mark.parametrize("driver", ["process", VM])
def test_an_endless_reply_is_cut_at_max_reply(boot_flooder, driver) -> None:
    """The attack that grew the app to 3 GiB in 5 s: fragments flagged "more", forever."""
    flooder = boot_flooder(driver, max_reply=4 * MiB)
    with pytest.raises(ReplyTooLarge):
        flooder.endless_reply()
    assert _eventually(lambda: flooder.last_attack()[1] is not None)
    sent, how = flooder.last_attack()
    assert how == "ChannelClosed"  # the app dropped the channel: the sender was told
    assert sent <= 4 * MiB + 2 * MiB  # what it accepted, and the fragment it refused
    assert flooder.echo("still serving") == "still serving"


def test_the_default_bound_is_64_mib(boot_flooder) -> None:
    assert DEFAULT_MAX_REPLY == 64 * MiB
    flooder = boot_flooder("process")
    assert len(flooder.blob(32 * MiB)) == 32 * MiB
    with pytest.raises(ReplyTooLarge, match="max_reply of 67108864 bytes"):
        flooder.blob(DEFAULT_MAX_REPLY)  # with its frame's own few bytes, just over
    assert flooder.echo("still serving") == "still serving"


def test_max_reply_is_a_compartment_key_of_flexos_yaml(tmp_path: Path) -> None:
    def load(key: str) -> flexos.Image:
        path = tmp_path / "flexos.yaml"
        path.write_text(
            textwrap.dedent(
                f"""\
                compartments:
                  - name: app
                    mechanism: {{driver: fcalls}}
                    default: true
                  - name: box
                    mechanism: {{driver: process}}
                    {key}
                libraries:
                  json: {{compartment: box}}
                """
            )
        )
        return flexos.load(path)

    assert load("max_reply: 2MiB").compartments["box"].max_reply == 2 * MiB
    assert load("max_reply: 268435456").compartments["box"].max_reply == 256 * MiB
    assert load("restart: never").compartments["box"].max_reply == DEFAULT_MAX_REPLY
    with pytest.raises(flexos.ConfigError, match=r"flexos\.yaml:7: .*below 1MiB"):
        load("max_reply: 512KiB")
    with pytest.raises(flexos.ConfigError, match=r"flexos\.yaml:7: .*'lots' is not a size"):
        load("max_reply: lots")


# -- item 12: timeout is a deadline for the whole call ------------------------------------------


@pytest.mark.parametrize("driver", ["process", VM])
def test_callbacks_cannot_keep_a_call_open_past_its_timeout(boot_flooder, driver) -> None:
    """Each callback answers at once, so no single wait is long; the call as a whole is."""
    flooder = boot_flooder(driver, timeout=2.0)
    assert flooder.echo("warm") == "warm"  # the guest is booted; only the call is timed
    calls: list[float] = []
    start = time.monotonic()
    with pytest.raises(flexos.CompartmentCrashed, match=r"timeout of 2\.0 s"):
        flooder.drip_callbacks(lambda: calls.append(time.monotonic()), 5, 0.8)
    assert time.monotonic() - start < 3.5
    assert len(calls) < 5
    assert flooder.echo("restarted") == "restarted"


def test_a_drip_fed_reply_cannot_outlast_the_timeout(boot_flooder) -> None:
    """Fragments one second apart: each arrives well within 2 s, the whole reply does not."""
    flooder = boot_flooder("process", timeout=2.0)
    start = time.monotonic()
    with pytest.raises(flexos.CompartmentCrashed, match=r"timeout of 2\.0 s"):
        flooder.drip_reply(int(3.5 * MiB), 1.0)
    assert time.monotonic() - start < 3.0
    assert flooder.echo("restarted") == "restarted"


def test_a_compartment_that_acknowledges_slowly_cannot_outlast_the_timeout(boot_flooder) -> None:
    """The app's large argument goes out in fragments, each waiting for the compartment's ack."""
    flooder = boot_flooder("process", timeout=2.0)
    assert flooder.read_slowly(1.0) == "slow"
    start = time.monotonic()
    with pytest.raises(flexos.CompartmentCrashed, match=r"timeout of 2\.0 s"):
        flooder.echo("a" * int(3.5 * MiB))  # text: bytes would cross in the bulk arena, unfragmented
    assert time.monotonic() - start < 3.5  # unbounded, its four fragments would take 4 s of acks
    assert flooder.echo("restarted") == "restarted"


# -- item 13: channels a compartment may hold open to the app -----------------------------------


def test_abandoned_channels_are_bounded_and_the_compartment_is_the_one_that_fails(boot_flooder) -> None:
    flooder = boot_flooder("process")
    assert flooder.echo("booted") == "booted"
    threads, fds = _serving_threads(), _open_fds()
    assert flooder.abandon_channels(PEER_CHANNELS + 36) == (PEER_CHANNELS + 36, 36)
    assert _serving_threads() - threads <= PEER_CHANNELS
    assert _open_fds() - fds <= 3 * PEER_CHANNELS + 4  # per channel served: two eventfds, the mapping's
    answer = flooder.call_app_from_new_thread(lambda: 42)  # it needs one more channel: refused
    assert answer.startswith("refused: ProtocolError"), answer
    assert flooder.echo("the app still calls in") == "the app still calls in"
    assert flooder.release_channels() == "released"
    assert _eventually(lambda: _serving_threads() <= threads)
    assert flooder.call_app_from_new_thread(lambda: 42) == "answered: 42"


@pytest.mark.slow
@pytest.mark.parametrize("driver", [VM])
def test_a_vm_compartment_cannot_have_one_channel_served_twice(boot_flooder, driver) -> None:
    """Its channels are the window's slots (31); announcing a slot again must not start another
    server on it (each would be a thread of the app's, racing the first on the same memory)."""
    flooder = boot_flooder(driver)
    assert flooder.echo("booted") == "booted"
    threads = _serving_threads()
    flooder.reannounce_channel(20)
    assert flooder.echo("announced") == "announced"  # the app read every announcement before this
    time.sleep(0.5)
    assert _serving_threads() - threads == 1
    assert flooder.call_app_from_new_thread(lambda: 42) == "answered: 42"


# -- item 14: a saturated eventfd --------------------------------------------------------------


def test_a_saturated_wakeup_counter_does_not_escape_a_gate_call(boot_flooder) -> None:
    """The app wakes a sleeping compartment with eventfd_write(1), which the kernel refuses
    (EAGAIN) once the compartment has filled the counter: that is no reason to fail the call."""
    flooder = boot_flooder("process")
    assert flooder.saturate_wakeups() == "saturated"
    for i in range(5):
        time.sleep(0.02)  # it is asleep, counter full, when the call arrives
        assert flooder.echo(i) == i
