"""A subinterp compartment reaches nothing of its process but its own gate (issue 12, item 10).

The hostile library (tests/fixtures/interpspy.py) runs in subinterp compartment ``box``; an honest
one (tests/fixtures/interpvictim.py) in its sibling ``other``. Both are interpreters of the app's
own process, so both can import ``flexos._subinterp`` and the stdlib's ``_interpreters``: the
module itself must refuse to run code in, call, end or lend from the wrong interpreter. What it
cannot refuse, native code, is the driver's documented caveat, which ``flexos check`` prints.
"""

from __future__ import annotations

import importlib
import os
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import flexos
from flexos import CompartmentSpec, Image
from flexos.drivers import unavailable

pytestmark = pytest.mark.skipif(
    unavailable("subinterp") is not None, reason=f"subinterp unavailable here: {unavailable('subinterp')}"
)

FIXTURES = ("interpspy", "interpvictim")


def _forget() -> None:
    for name in FIXTURES:
        sys.modules.pop(name, None)


@pytest.fixture
def runtime() -> Iterator[flexos.Runtime]:
    _forget()
    image = Image(
        {
            "app": CompartmentSpec("app", "fcalls", default=True),
            "box": CompartmentSpec("box", "subinterp"),
            "other": CompartmentSpec("other", "subinterp"),
        },
        {"interpspy": "box", "interpvictim": "other"},
        source="<tests/security/test_subinterp_escape>",
    )
    with flexos.boot(image) as booted:
        yield booted
    _forget()


@pytest.fixture
def spy(runtime: flexos.Runtime):
    return importlib.import_module("interpspy")


@pytest.fixture
def victim(runtime: flexos.Runtime):
    return importlib.import_module("interpvictim")


def _healthy(spy, victim, victim_id: int) -> None:
    assert victim.interpreter_id() == victim_id
    assert victim.SECRET == "the sibling's secret"
    assert spy.interpreter_id() not in (0, victim_id)


def test_a_compartment_runs_no_code_in_another_interpreter(spy, victim, tmp_path: Path) -> None:
    marker = tmp_path / "ran-elsewhere"
    victim_id = victim.interpreter_id()
    tried = spy.run_elsewhere(f"open({str(marker)!r}, 'w').close()")
    assert {f"flexos {victim_id}", f"stdlib {victim_id}", "flexos 0", "stdlib 0"} <= set(tried)
    assert all(answer.startswith("refused") for answer in tried.values()), tried
    assert "only the app may do this" in tried[f"flexos {victim_id}"]
    assert not marker.exists()
    _healthy(spy, victim, victim_id)


def test_a_compartment_ends_no_other_interpreter(spy, victim) -> None:
    victim_id = victim.interpreter_id()
    tried = spy.end_elsewhere()
    assert {f"flexos {victim_id}", f"stdlib {victim_id}"} <= set(tried)
    assert all(answer.startswith("refused") for answer in tried.values()), tried
    _healthy(spy, victim, victim_id)


def test_a_compartment_calls_no_gate_but_its_own(spy, victim) -> None:
    """Neither its sibling's gate (where it would speak as the app) nor the app's gate for its
    sibling (where it would speak as the sibling): only the app's gate for itself, and its own."""
    victim_id = victim.interpreter_id()
    answers = spy.call_other_gates()
    answered = [gate for gate, answer in answers.items() if answer.startswith("answered")]
    refused = [gate for gate, answer in answers.items() if answer == "refused: PermissionError"]
    assert len(answered) <= 1, answers  # its own gate (it serves the app there) answers itself
    assert len(refused) >= 2, answers  # other's gate, and the app's gate for other
    _healthy(spy, victim, victim_id)


def test_a_compartment_registers_one_gate(spy, victim) -> None:
    """Gates are slots of one process-wide table: more would let a compartment fill it."""
    assert spy.register_gates(2000) == (0, "refused: PermissionError")
    _healthy(spy, victim, victim.interpreter_id())


def test_a_compartment_cannot_lend_the_app_a_buffer_it_changes_later(spy) -> None:
    """A loan from a compartment would let it change bytes after the app checked them."""
    with pytest.raises(PermissionError, match="only the app may do this"):
        spy.lend_to_app(100_000)
    assert spy.change_lent() == 1
    assert spy.digest(b"still serving")[:2] == ("bytes", 13)


def test_loans_go_from_the_app_to_the_one_compartment_they_were_made_for(runtime, spy, victim) -> None:
    from flexos import _subinterp
    from flexos.transports.interp import InterpreterTransport

    big = b"z" * 100_000
    assert spy.digest(big)[:2] == ("memoryview", len(big))  # the app still lends, zero-copy

    def loan_to(name: str) -> bytes:
        gate = runtime.compartments[name].link()._transport._endpoint
        return struct.pack("<qQq", *_subinterp.lend(big, gate))

    with pytest.raises(ValueError, match="not a compartment's"):  # the app's own gate for box
        _subinterp.lend(big, runtime.compartments["box"].driver._gate)
    for_other = loan_to("other")
    assert spy.borrow(for_other).startswith("refused: ProtocolError")  # lent to its sibling
    with pytest.raises(flexos.ProtocolError):
        InterpreterTransport.borrow(for_other)  # the app never borrows
    for_box = loan_to("box")
    loan, address, length = struct.unpack("<qQq", for_box)
    for forged in (
        struct.pack("<qQq", loan, address + 4096, length),
        struct.pack("<qQq", loan, address, length + 1),
        b"short",
    ):
        assert spy.borrow(forged).startswith("refused: ProtocolError")
    assert spy.borrow(for_box) == "borrowed b'zzz'"
    assert spy.borrow(for_box).startswith("refused: ProtocolError")  # borrowed once: one view, one release
    assert victim.digest(big)[:2] == ("memoryview", len(big))


def test_native_access_to_the_process_memory_is_not_refused(spy) -> None:
    """The documented caveat, asserted so that it stays true in the docs: no gate is needed to read
    the app's objects through /proc/self/mem from a subinterp compartment."""
    secret = b"app-only " + os.urandom(16).hex().encode()
    payload_offset = sys.getsizeof(b"") - 1  # where a bytes object's data starts (CPython's layout)
    assert spy.read_memory(id(secret) + payload_offset, len(secret)) == secret


def test_flexos_check_says_subinterp_is_no_boundary_against_native_code(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(
        textwrap.dedent(
            """\
            compartments:
              - name: app
                mechanism: {driver: fcalls}
                default: true
              - name: parsers
                mechanism: {driver: subinterp}
              - name: db
                mechanism: {driver: process}
            libraries:
              json: {compartment: parsers}
            """
        )
    )
    flexos_command = Path(sys.executable).parent / "flexos"
    check = subprocess.run([str(flexos_command), "check"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = check.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["parsers", "subinterp"])
    caveat = lines[at + 1]
    assert caveat.split()[0] == "subinterp:" and "not a boundary against native code" in caveat
    assert "ctypes" in caveat and "/proc/self/mem" in caveat
    assert sum("not a boundary against native code" in line for line in lines) == 1  # not next to db
