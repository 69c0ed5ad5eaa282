"""Fault containment: a compartment that hangs is ended within its timeout and the app goes on."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path

import pytest

import flexos
from flexos.config import parse


def test_a_hung_call_is_ended_within_the_timeout_and_the_compartment_restarts(boot_attacker) -> None:
    attacker = boot_attacker(timeout=1.0)
    first = attacker.pid()
    started = time.monotonic()
    with pytest.raises(flexos.CompartmentCrashed, match=r"no answer within its timeout of 1\.0 s") as info:
        attacker.hang(60)
    assert time.monotonic() - started < 10
    assert info.value.signal == signal.SIGKILL
    assert attacker.pid() != first  # a fresh instance answers the next call


def test_calls_shorter_than_the_timeout_are_untouched(boot_attacker) -> None:
    attacker = boot_attacker(timeout=5.0)
    assert attacker.hang(0.2) == "woke up"


def test_without_a_timeout_a_slow_call_is_waited_for(boot_attacker) -> None:
    assert boot_attacker(timeout=None).hang(1.5) == "woke up"


def test_restart_never_keeps_a_timed_out_compartment_down(boot_attacker) -> None:
    attacker = boot_attacker(timeout=0.5, restart="never")
    with pytest.raises(flexos.CompartmentCrashed):
        attacker.hang(60)
    with pytest.raises(flexos.CompartmentCrashed):
        attacker.pid()


def test_a_timeout_needs_the_process_driver(tmp_path: Path) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            compartments:
              - name: app
                mechanism: {driver: fcalls}
                default: true
              - name: box
                mechanism: {driver: fcalls, strict: true}
                timeout: 5
            libraries:
              json: {compartment: box}
            """
        )
    )
    with pytest.raises(flexos.ConfigError) as info:
        parse(path)
    assert info.value.problems == [
        f"{path}:7: compartment 'box': a timeout needs driver 'process' or 'vm' (a stuck 'fcalls' call runs on the "
        "caller's own thread)"
    ]


@pytest.mark.parametrize(("fault", "expected_signal"), [("segfault", signal.SIGSEGV), ("abort", signal.SIGABRT)])
def test_a_crashing_compartment_becomes_a_typed_exception_and_restarts(boot_attacker, fault, expected_signal) -> None:
    attacker = boot_attacker(timeout=None)
    first = attacker.pid()
    with pytest.raises(flexos.CompartmentCrashed) as info:
        getattr(attacker, fault)()
    assert info.value.signal == expected_signal
    assert info.value.compartment == "box"
    assert attacker.pid() not in (first, None)
