"""Control messages between flexos's own processes: everything a peer sends besides gate frames.

Gate frames (one compartment's code calling another's) are :mod:`flexos.wire.frames`. This
module is the rest of what can arrive from another compartment:

- the boot record the app hands a compartment it starts (:class:`BootRecord`, with the route
  table), and the compartment's answer (ready, or why not);
- sibling brokering between a compartment process and the app (connect / peer / refused);
- the messages of a vm guest's two mailboxes: the agent's (hello, start / started, kill / killed)
  and the compartment's (channel openings, control messages, the boot answer).

Every reader checks the exact shape of what it reads and raises ProtocolError on anything else.
Standard library and msgpack only: a compartment reads its boot record before anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from flexos.errors import ProtocolError
from flexos.image import Image

#: Largest control message a socket carries (SOCK_SEQPACKET truncates longer ones); a refusal's
#: reason is cut to fit.
CONTROL_MAX = 4096
#: What a shm transport sends, with a channel's three descriptors, to open a channel.
OPEN_CHANNEL = b"open"


def encode(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(data: bytes) -> list[Any]:
    """A control message: a msgpack list whose first item is its verb (a string)."""
    if not data:
        raise ProtocolError("no message: the peer closed the connection")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"undecodable control message ({type(exc).__name__})") from None
    if type(message) is not list or not message or type(message[0]) is not str:
        raise ProtocolError("malformed control message")
    return message


# -- routes and the boot record -----------------------------------------------------------------


class Route:
    """How a compartment reaches the modules of another one (a boot record's route table)."""

    #: Over a connection of its own to the other compartment, which the app brokers.
    DIRECT = "direct"
    #: Through the app, which hands out its own gate to the module and so relays every call.
    VIA_APP = "via-app"
    #: Through the app, where the other compartment's modules run unisolated (fcalls).
    IN_APP = "in-app"


ROUTES = frozenset({Route.DIRECT, Route.VIA_APP, Route.IN_APP})


@dataclass(frozen=True)
class BootRecord:
    """What the app tells a compartment it starts: who it is, the image, and how to reach the others."""

    name: str
    image: Image
    sys_path: list[str]
    argv: list[str]
    #: For every compartment but this one and the app's: a Route.
    routes: dict[str, str]
    #: How long a side waiting for a frame spins before it sleeps, in µs (process, vm; 0 where
    #: nothing spins).
    spin_us: float = 0.0
    #: The app's working directory, which the compartment changes to when it can see it (vm).
    cwd: str | None = None
    #: The endpoint of the app's dispatcher, which the compartment calls into (subinterp).
    parent: int | None = None

    def to_wire(self) -> bytes:
        return msgpack.packb(
            {
                "name": self.name,
                "image": self.image.to_dict(),
                "sys_path": self.sys_path,
                "argv": self.argv,
                "routes": self.routes,
                "spin_us": self.spin_us,
                "cwd": self.cwd,
                "parent": self.parent,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_wire(cls, data: bytes) -> BootRecord:
        try:
            record = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise ProtocolError(f"undecodable boot record ({type(exc).__name__})") from None
        if type(record) is not dict or set(record) != _BOOT_FIELDS:
            raise ProtocolError("malformed boot record")
        name, routes = record["name"], record["routes"]
        if (
            type(name) is not str
            or type(record["image"]) is not dict
            or not _strings(record["sys_path"])
            or not _strings(record["argv"])
            or type(routes) is not dict
            or not all(type(key) is str and value in ROUTES for key, value in routes.items())
            or type(record["spin_us"]) not in (int, float)
            or type(record["cwd"]) not in (str, type(None))
            or type(record["parent"]) not in (int, type(None))
        ):
            raise ProtocolError("malformed boot record")
        try:
            image = Image.from_dict(record["image"])
            default = image.default
        except (KeyError, TypeError, ValueError, AttributeError, StopIteration) as exc:
            raise ProtocolError(f"boot record has a malformed image ({type(exc).__name__}: {exc})") from None
        if name not in image.compartments or name == default:
            raise ProtocolError(f"boot record names compartment {name!r}, which the image does not have")
        if set(routes) != set(image.compartments) - {name, default}:
            raise ProtocolError("boot record's routes do not cover exactly the image's other compartments")
        return cls(
            name=name,
            image=image,
            sys_path=record["sys_path"],
            argv=record["argv"],
            routes=routes,
            spin_us=float(record["spin_us"]),
            cwd=record["cwd"],
            parent=record["parent"],
        )


_BOOT_FIELDS = frozenset({"name", "image", "sys_path", "argv", "routes", "spin_us", "cwd", "parent"})


def _strings(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


# The compartment's answer to its boot record (process: over its socket; vm: on its mailbox).
READY = "ready"
FAILED = "error"


def ready() -> list[Any]:
    return [READY]


def boot_failed(detail: str) -> list[Any]:
    return [FAILED, detail]


def read_boot_answer(message: list[Any]) -> str | None:
    """None if the compartment is ready, else why it is not."""
    if message == [READY]:
        return None
    if len(message) == 2 and message[0] == FAILED and type(message[1]) is str:
        return message[1]
    raise ProtocolError(f"malformed answer to a boot record: {message!r:.200}")


# -- sibling brokering (a compartment process and the app) --------------------------------------

#: Compartment -> app: connect me to compartment NAME.
CONNECT = "connect"
#: App -> compartment, with one socket: this connects you to compartment NAME.
PEER = "peer"
#: App -> compartment: NAME cannot be connected to you, and why.
REFUSED = "refused"


@dataclass(frozen=True)
class SiblingMessage:
    verb: str
    name: str
    reason: str = ""


def connect(name: str) -> bytes:
    return encode([CONNECT, name])


def peer(name: str) -> bytes:
    return encode([PEER, name])


def refused(name: str, reason: str) -> bytes:
    """A refusal, its reason cut so that the message fits CONTROL_MAX."""
    room = CONTROL_MAX - len(encode([REFUSED, name, ""])) - 4  # a longer string's header takes 4 more bytes
    return encode([REFUSED, name, reason.encode()[: max(room, 0)].decode("utf-8", "ignore")])


def read_sibling_message(data: bytes) -> SiblingMessage:
    if len(data) > CONTROL_MAX:
        raise ProtocolError("control message too long")
    message = decode(data)
    verb, size = message[0], len(message)
    if (verb in (CONNECT, PEER) and size == 2) or (verb == REFUSED and size == 3 and type(message[2]) is str):
        if type(message[1]) is str and message[1]:
            return SiblingMessage(*message)
    raise ProtocolError(f"malformed sibling message {verb!r}")


# -- a vm guest's mailboxes ---------------------------------------------------------------------

# The agent's mailbox: the agent greets, then the host commands and the agent answers.
AGENT = "agent"
START = "start"
STARTED = "started"
KILL = "kill"
KILLED = "killed"


def agent_hello(python: str, kernel: str) -> list[Any]:
    return [AGENT, {"python": python, "kernel": kernel}]


def read_agent_hello(message: list[Any]) -> dict[str, str]:
    if len(message) != 2 or message[0] != AGENT or type(message[1]) is not dict:
        raise ProtocolError(f"the guest greeted with {message!r:.200}")
    facts = message[1]
    if not all(type(key) is str and type(value) is str for key, value in facts.items()):
        raise ProtocolError(f"the guest greeted with {message!r:.200}")
    return facts


def start(epoch: int, boot: BootRecord) -> list[Any]:
    """Fork compartment ``boot`` (its ``epoch`` tells its status word apart from its predecessors')."""
    return [START, epoch, boot.to_wire()]


def kill() -> list[Any]:
    return [KILL]


@dataclass(frozen=True)
class AgentCommand:
    verb: str  # START or KILL
    epoch: int = 0
    boot: bytes = b""  # a BootRecord's wire form, read by the compartment it starts


def read_agent_command(message: list[Any]) -> AgentCommand:
    if message == [KILL]:
        return AgentCommand(KILL)
    if len(message) == 3 and message[0] == START and type(message[1]) is int and type(message[2]) is bytes:
        return AgentCommand(START, message[1], message[2])
    raise ProtocolError(f"malformed agent command {message[0]!r}")


def started(pid: int) -> list[Any]:
    return [STARTED, pid]


def read_started(message: list[Any]) -> int:
    """The guest pid of the compartment the agent started."""
    if len(message) != 2 or message[0] != STARTED or type(message[1]) is not int:
        raise ProtocolError(f"the guest agent answered {message!r:.200} to start")
    return message[1]


def killed(returncode: int | None) -> list[Any]:
    return [KILLED, returncode]


def read_killed(message: list[Any]) -> int | None:
    """The exit status of the compartment the agent killed (None: it did not end in time)."""
    if len(message) != 2 or message[0] != KILLED or type(message[1]) not in (int, type(None)):
        raise ProtocolError(f"the guest agent answered {message!r:.200} to kill")
    return message[1]


# The compartment's mailbox: channel openings and control messages, both ways.
OPEN = "open"
CONTROL = "control"


def channel_opened(slot: int) -> list[Any]:
    return [OPEN, slot]


def window_control(data: bytes) -> list[Any]:
    return [CONTROL, data]


def read_window_message(message: list[Any]) -> tuple[str, int | bytes]:
    """(OPEN, slot) or (CONTROL, message)."""
    if len(message) == 2:
        if message[0] == OPEN and type(message[1]) is int:
            return OPEN, message[1]
        if message[0] == CONTROL and type(message[1]) is bytes:
            return CONTROL, message[1]
    raise ProtocolError(f"malformed mailbox message {message[0]!r}")
