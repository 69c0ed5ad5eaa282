"""RESP reply encoding (the server's side of the protocol, trusted output)."""

from __future__ import annotations

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NIL = b"$-1\r\n"


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def error(message: str) -> bytes:
    return b"-" + message.encode("utf-8", "replace").replace(b"\r\n", b" ") + b"\r\n"


def array(items: list[bytes]) -> bytes:
    """An array of bulk strings."""
    return b"*%d\r\n" % len(items) + b"".join(bulk(item) for item in items)
