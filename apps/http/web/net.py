"""The network front end: an asyncio server that answers in batches.

Reads that arrive in the same turn of the event loop are parsed together in one call to the
parser and answered together in one call to the handler (a flush scheduled with ``call_soon``),
so the cost of reaching those components is paid per turn, not per request.
"""

from __future__ import annotations

import asyncio
import traceback
from http import HTTPStatus
from typing import Protocol

from web.parser import Parsers, Request

Response = tuple[int, str, bytes]


class Responder(Protocol):
    def respond(self, requests: dict[int, list[Request]]) -> dict[int, list[Response]]: ...


def encode_response(status: int, content_type: str, body: bytes, keep_alive: bool, head: bool) -> bytes:
    reason = HTTPStatus(status).phrase
    connection = "keep-alive" if keep_alive else "close"
    head_bytes = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {connection}\r\n\r\n"
    ).encode("latin-1")
    return head_bytes if head else head_bytes + body


class Batcher:
    """Collects the reads of one loop turn and answers them together."""

    def __init__(self, site: Responder) -> None:
        self.site = site
        self.parsers = Parsers()
        self.connections: dict[int, _Connection] = {}
        self._reads: dict[int, bytes] = {}
        self._closed: list[int] = []
        self._next_id = 0
        self._scheduled = False

    def connect(self, connection: _Connection) -> int:
        self._next_id += 1
        self.connections[self._next_id] = connection
        return self._next_id

    def received(self, conn: int, data: bytes) -> None:
        pending = self._reads.get(conn)
        self._reads[conn] = data if pending is None else pending + data
        self._schedule()

    def lost(self, conn: int) -> None:
        self.connections.pop(conn, None)
        self._reads.pop(conn, None)
        self._closed.append(conn)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        reads, self._reads = self._reads, {}
        closed, self._closed = self._closed, []
        requests, errors = self.parsers.feed(reads, closed)
        for conn, message in errors.items():
            connection = self.connections.get(conn)
            if connection is not None:
                connection.send(encode_response(400, "text/plain", f"bad request: {message}\n".encode(), False, False))
                connection.close()
        if not requests:
            return
        try:
            answers = self.site.respond(requests)
        except Exception:  # answer every waiting client rather than leave it hanging
            traceback.print_exc()
            failed = (500, "text/plain", b"internal server error\n")
            answers = {conn: [failed] * len(batch) for conn, batch in requests.items()}
        for conn, batch in requests.items():
            connection = self.connections.get(conn)
            if connection is None:
                continue
            keep_alive = True
            out = []
            for (method, _target, _headers, _body, keep_alive), (status, content_type, body) in zip(
                batch, answers[conn], strict=True
            ):
                out.append(encode_response(status, content_type, body, keep_alive, method == "HEAD"))
            connection.send(b"".join(out))
            if not keep_alive:
                connection.close()


class _Connection(asyncio.Protocol):
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher
        self.transport: asyncio.Transport | None = None
        self.id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.id = self.batcher.connect(self)

    def data_received(self, data: bytes) -> None:
        self.batcher.received(self.id, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.batcher.lost(self.id)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.close()


async def _serve(host: str, port: int, site: Responder) -> None:
    batcher = Batcher(site)
    server = await asyncio.get_running_loop().create_server(lambda: _Connection(batcher), host, port, backlog=512)
    address = server.sockets[0].getsockname()
    print(f"web: listening on {address[0]}:{address[1]}", flush=True)
    async with server:
        await server.serve_forever()


def serve(host: str, port: int, site: Responder) -> None:
    """Serve HTTP clients on ``host:port`` (port 0: any free port) until interrupted."""
    asyncio.run(_serve(host, port, site))
