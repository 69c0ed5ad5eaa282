"""The command logic and the in-memory dataset: batches of commands in, their replies out.

Writes are handed to a persistence log (``append``) once per batch, rewritten to their effect
(``INCR k`` is logged as ``SET k <new value>``), as Redis rewrites commands for its AOF.
"""

from __future__ import annotations

from typing import Protocol

from kv import replies


class Log(Protocol):
    def replay(self) -> list[list[bytes]]: ...

    def append(self, commands: list[list[bytes]]) -> None: ...


class Store:
    """The dataset and the commands on it."""

    def __init__(self, log: Log | None = None) -> None:
        self.data: dict[bytes, bytes] = {}
        self.log = log
        self.config = {b"save": b"", b"appendonly": b"yes" if log is not None else b"no"}
        if log is not None:
            for command in log.replay():
                self._run(command, [])

    def execute(self, batches: dict[int, list[list[bytes]]]) -> dict[int, bytes]:
        """Run each connection's commands in order; return each connection's replies in RESP.

        The writes of the whole call are handed to the log in one ``append``.
        """
        writes: list[list[bytes]] = []
        run = self._run
        out = {conn: b"".join([run(command, writes) for command in commands]) for conn, commands in batches.items()}
        if writes and self.log is not None:
            self.log.append(writes)
        return out

    def _run(self, command: list[bytes], writes: list[list[bytes]]) -> bytes:
        name = command[0].upper()
        args = command[1:]
        handler = _COMMANDS.get(name)
        if handler is None:
            return replies.error(f"ERR unknown command '{name.decode('utf-8', 'replace')}'")
        method, arity = handler
        if len(args) < arity[0] or (arity[1] is not None and len(args) > arity[1]):
            return replies.error(f"ERR wrong number of arguments for '{name.decode().lower()}' command")
        return method(self, args, writes)

    # -- commands: (self, arguments, writes to log) -> reply ------------------------------------
    def _get(self, args: list[bytes], writes: list) -> bytes:
        value = self.data.get(args[0])
        return replies.NIL if value is None else replies.bulk(value)

    def _set(self, args: list[bytes], writes: list) -> bytes:
        self.data[args[0]] = args[1]
        writes.append([b"SET", args[0], args[1]])
        return replies.OK

    def _del(self, args: list[bytes], writes: list) -> bytes:
        removed = [key for key in args if self.data.pop(key, None) is not None]
        if removed:
            writes.append([b"DEL", *removed])
        return replies.integer(len(removed))

    def _exists(self, args: list[bytes], writes: list) -> bytes:
        return replies.integer(sum(key in self.data for key in args))

    def _incr(self, args: list[bytes], writes: list) -> bytes:
        try:
            value = int(self.data.get(args[0], b"0")) + 1
        except ValueError:
            return replies.error("ERR value is not an integer or out of range")
        encoded = b"%d" % value
        self.data[args[0]] = encoded
        writes.append([b"SET", args[0], encoded])
        return replies.integer(value)

    def _dbsize(self, args: list[bytes], writes: list) -> bytes:
        return replies.integer(len(self.data))

    def _flushall(self, args: list[bytes], writes: list) -> bytes:
        self.data.clear()
        writes.append([b"FLUSHALL"])
        return replies.OK

    def _ping(self, args: list[bytes], writes: list) -> bytes:
        return replies.bulk(args[0]) if args else replies.PONG

    def _echo(self, args: list[bytes], writes: list) -> bytes:
        return replies.bulk(args[0])

    def _config(self, args: list[bytes], writes: list) -> bytes:
        if args[0].upper() != b"GET":
            return replies.error("ERR only CONFIG GET is supported")
        items: list[bytes] = []
        for pattern in args[1:]:
            if pattern in self.config:
                items += [pattern, self.config[pattern]]
        return replies.array(items)

    def _command(self, args: list[bytes], writes: list) -> bytes:
        return replies.array([])


# command -> (method, (min args, max args or None))
_COMMANDS = {
    b"GET": (Store._get, (1, 1)),
    b"SET": (Store._set, (2, 2)),
    b"DEL": (Store._del, (1, None)),
    b"EXISTS": (Store._exists, (1, None)),
    b"INCR": (Store._incr, (1, 1)),
    b"DBSIZE": (Store._dbsize, (0, 0)),
    b"FLUSHALL": (Store._flushall, (0, 0)),
    b"PING": (Store._ping, (0, 1)),
    b"ECHO": (Store._echo, (1, 1)),
    b"CONFIG": (Store._config, (1, None)),
    b"COMMAND": (Store._command, (0, None)),
}
