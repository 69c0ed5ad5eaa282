"""The control plane's wire (flexos/wire/control.py): what one flexos process can tell another
besides gate frames, and that each reader refuses anything but the exact shape it expects."""

from __future__ import annotations

import msgpack
import pytest

from flexos import CompartmentSpec, Image
from flexos.errors import ProtocolError
from flexos.wire import control
from flexos.wire.control import BootRecord, Route

IMAGE = Image(
    {
        "app": CompartmentSpec("app", "fcalls", default=True),
        "box": CompartmentSpec("box", "process", {"spin_us": 50}, timeout=2.5),
        "other": CompartmentSpec("other", "subinterp"),
    },
    {"complib": "box", "interplib": "other"},
    source="<test_wire_control>",
)


def _record(**changes: object) -> BootRecord:
    fields = {
        "name": "box",
        "image": IMAGE,
        "sys_path": ["/x"],
        "argv": ["app.py", "-v"],
        "routes": {"other": Route.VIA_APP},
        "spin_us": 50.0,
    }
    return BootRecord(**{**fields, **changes})


def _wire(**changes: object) -> bytes:
    """A boot record's wire form with fields replaced by raw values."""
    fields = msgpack.unpackb(_record().to_wire())
    return msgpack.packb({**fields, **changes})


def test_a_boot_record_crosses_whole() -> None:
    record = _record(cwd="/work", parent=7)
    assert BootRecord.from_wire(record.to_wire()) == record


@pytest.mark.parametrize(
    "changes",
    [
        {"name": 3},
        {"name": "nowhere"},
        {"name": "app"},  # the app is never booted
        {"sys_path": "/x"},
        {"argv": [b"app.py"]},
        {"routes": {"other": "teleport"}},
        {"routes": {}},  # a compartment it could not reach
        {"routes": {"other": Route.VIA_APP, "box": Route.DIRECT}},  # itself
        {"spin_us": "fast"},
        {"cwd": 1},
        {"parent": "7"},
        {"image": {"compartments": []}},
        {"image": []},
        {"extra": 1},
    ],
    ids=repr,
)
def test_a_malformed_boot_record_is_refused(changes: dict) -> None:
    with pytest.raises(ProtocolError):
        BootRecord.from_wire(_wire(**changes))


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"name": "box"})])
def test_bytes_that_are_no_boot_record_are_refused(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        BootRecord.from_wire(data)


def test_the_boot_answer() -> None:
    assert control.read_boot_answer(control.ready()) is None
    assert control.read_boot_answer(control.boot_failed("Traceback ...")) == "Traceback ..."
    for answer in (["ready", 1], ["error"], ["error", 3], ["started", 1]):
        with pytest.raises(ProtocolError):
            control.read_boot_answer(answer)


def test_sibling_messages_cross_and_are_checked() -> None:
    assert control.read_sibling_message(control.connect("box")) == control.SiblingMessage(control.CONNECT, "box")
    assert control.read_sibling_message(control.peer("box")) == control.SiblingMessage(control.PEER, "box")
    refusal = control.read_sibling_message(control.refused("box", "it failed to boot"))
    assert refusal == control.SiblingMessage(control.REFUSED, "box", "it failed to boot")
    for data in (
        b"connect box",  # the old text form
        control.encode(["connect", ""]),
        control.encode(["connect", "box", "extra"]),
        control.encode(["peer", 1]),
        control.encode(["refused", "box"]),
        control.encode(["open", "box"]),
        b"\x92" * (control.CONTROL_MAX + 1),
    ):
        with pytest.raises(ProtocolError):
            control.read_sibling_message(data)


def test_a_long_refusal_is_cut_to_fit_a_control_message() -> None:
    """SOCK_SEQPACKET would truncate a longer message into bytes that no longer decode."""
    data = control.refused("box", "é" * 10_000)
    assert len(data) <= control.CONTROL_MAX
    reason = control.read_sibling_message(data).reason
    assert 0 < len(reason) < 10_000 and set(reason) == {"é"}


def test_agent_mailbox_messages_cross_and_are_checked() -> None:
    assert control.read_agent_hello(control.agent_hello("3.13.0", "6.1.0")) == {"python": "3.13.0", "kernel": "6.1.0"}
    command = control.read_agent_command(control.start(4, _record()))
    assert (command.verb, command.epoch) == (control.START, 4)
    assert BootRecord.from_wire(command.boot) == _record()
    assert control.read_agent_command(control.kill()).verb == control.KILL
    assert control.read_started(control.started(123)) == 123
    assert control.read_killed(control.killed(-9)) == -9
    assert control.read_killed(control.killed(None)) is None
    bad = [
        (control.read_agent_hello, ["agent", {"python": 3}]),
        (control.read_agent_hello, ["agent"]),
        (control.read_agent_command, ["start", "4", b""]),
        (control.read_agent_command, ["start", 4, {}]),
        (control.read_agent_command, ["reboot"]),
        (control.read_started, ["started", "123"]),
        (control.read_started, ["killed", 0]),
        (control.read_killed, ["killed", "0"]),
    ]
    for reader, message in bad:
        with pytest.raises(ProtocolError):
            reader(message)


def test_compartment_mailbox_messages_cross_and_are_checked() -> None:
    assert control.read_window_message(control.channel_opened(5)) == (control.OPEN, 5)
    assert control.read_window_message(control.window_control(b"x")) == (control.CONTROL, b"x")
    for message in (["open", "5"], ["control", "x"], ["open"], ["close", 5]):
        with pytest.raises(ProtocolError):
            control.read_window_message(message)


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([]), msgpack.packb([1]), msgpack.packb({"a": 1})])
def test_a_control_message_is_a_list_headed_by_its_verb(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        control.decode(data)
