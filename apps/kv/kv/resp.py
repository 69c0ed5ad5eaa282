"""The RESP request parser: bytes from clients in, every complete command in them out.

Built on hiredis (the C parser Redis's own clients use). :class:`Parsers` keeps one incremental
reader per connection, and parses what every connection sent in one event-loop turn in one call:
the front end makes one call per turn, however many clients and pipelined commands it served.
"""

from __future__ import annotations

import hiredis


class ProtocolError(Exception):
    """The client sent bytes that are not RESP; its connection cannot be resynchronised."""


def parse_commands(reader: hiredis.Reader, data: bytes) -> list[list[bytes]]:
    """Feed ``data`` to ``reader``; return the commands it completes (each a list of arguments)."""
    reader.feed(data)
    commands = []
    try:
        command = reader.gets()
        while command is not False:
            if type(command) is not list or not command:
                raise ProtocolError("expected an array of bulk strings (a RESP command)")
            commands.append(command)
            command = reader.gets()
    except hiredis.ProtocolError as exc:
        raise ProtocolError(str(exc)) from None
    return commands


class Parsers:
    """Incremental parsers for many connections, named by the caller's connection ids."""

    def __init__(self) -> None:
        self._readers: dict[int, hiredis.Reader] = {}

    def feed(self, reads: dict[int, bytes], closed: list[int] = ()) -> tuple[dict[int, list], dict[int, str]]:
        """Parse each connection's new bytes; forget the ``closed`` connections.

        Returns the complete commands per connection, and the protocol errors per connection (a
        connection with an error is forgotten too: the caller should answer it and close it).
        """
        for conn in closed:
            self._readers.pop(conn, None)
        commands: dict[int, list] = {}
        errors: dict[int, str] = {}
        for conn, data in reads.items():
            reader = self._readers.get(conn)
            if reader is None:
                reader = self._readers[conn] = hiredis.Reader()
            try:
                parsed = parse_commands(reader, data)
            except ProtocolError as exc:
                errors[conn] = str(exc)
                del self._readers[conn]
                continue
            if parsed:
                commands[conn] = parsed
        return commands, errors
