"""The network front end: a single-threaded event loop over non-blocking sockets, as Redis's.

Each turn of the loop reads every ready connection, then parses all that was read in one call to
the parser and runs all the complete commands in one call to the store, then writes the replies.
So a turn costs two calls into the other components, however many clients and pipelined
commands it served.
"""

from __future__ import annotations

import selectors
import socket
from typing import Protocol

from kv.resp import Parsers

READ_SIZE = 64 * 1024


class CommandRunner(Protocol):
    def execute(self, batches: dict[int, list[list[bytes]]]) -> dict[int, bytes]: ...


class _Client:
    __slots__ = ("closing", "out", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()  # replies the socket did not take yet
        self.closing = False  # close once ``out`` is written


class Server:
    """Accepts clients on ``host:port`` and serves them until :meth:`serve_forever` is interrupted."""

    def __init__(self, host: str, port: int, store: CommandRunner) -> None:
        self.store = store
        self.parsers = Parsers()
        self.listener = socket.create_server((host, port), backlog=512)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.clients: dict[int, _Client] = {}

    def serve_forever(self) -> None:
        try:
            while True:
                self._turn()
        finally:
            for client in list(self.clients.values()):
                client.sock.close()
            self.selector.close()
            self.listener.close()

    def _turn(self) -> None:
        reads: dict[int, bytes] = {}
        closed: list[int] = []
        for key, events in self.selector.select():
            if key.fileobj is self.listener:
                self._accept()
                continue
            client = self.clients[key.fd]
            if events & selectors.EVENT_WRITE:
                self._flush(client)
            if events & selectors.EVENT_READ:
                try:
                    data = client.sock.recv(READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    reads[key.fd] = data
                else:
                    closed.append(key.fd)
        for fd in closed:
            self._drop(fd)
        if not reads and not closed:
            return
        commands, errors = self.parsers.feed(reads, closed)
        for fd, message in errors.items():
            self._send(fd, b"-ERR Protocol error: " + message.encode("utf-8", "replace") + b"\r\n")
            self.clients[fd].closing = True
        if commands:
            for fd, replies in self.store.execute(commands).items():
                self._send(fd, replies)
        for fd in [fd for fd, client in self.clients.items() if client.closing and not client.out]:
            self._drop(fd)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.clients[sock.fileno()] = _Client(sock)
            self.selector.register(sock, selectors.EVENT_READ)

    def _send(self, fd: int, data: bytes) -> None:
        client = self.clients[fd]
        if client.out:
            client.out += data
            return
        try:
            sent = client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            client.closing, client.out = True, bytearray()
            return
        if sent < len(data):
            client.out += data[sent:]
            self.selector.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            client.closing, client.out = True, bytearray()
            return
        del client.out[:sent]
        if not client.out:
            self.selector.modify(client.sock, selectors.EVENT_READ)

    def _drop(self, fd: int) -> None:
        client = self.clients.pop(fd)
        self.selector.unregister(client.sock)
        client.sock.close()


def serve(host: str, port: int, store: CommandRunner) -> None:
    """Serve RESP clients on ``host:port`` (port 0: any free port) until interrupted."""
    server = Server(host, port, store)
    print(f"kv: listening on {server.address[0]}:{server.address[1]}", flush=True)
    server.serve_forever()
