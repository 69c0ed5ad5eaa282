"""The HTTP request parser: bytes from clients in, every complete request in them out.

Built on httptools (llhttp, the C parser of Node.js). :class:`Parsers` keeps one incremental
parser per connection and parses what every connection sent in one event-loop turn in one call,
so the front end makes one call per turn however many clients it served. Requests come out as
plain tuples ``(method, target, headers, body, keep_alive)``.
"""

from __future__ import annotations

import httptools

Request = tuple[str, str, dict[str, str], bytes, bool]


class _Collector:
    """httptools' callback target for one connection: assembles the requests it completes."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.done: list[Request] = []
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", {}, []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method().decode("ascii")
        target = self._url.decode("latin-1")
        self.done.append((method, target, self._headers, b"".join(self._body), parser.should_keep_alive()))


class Parsers:
    """Incremental parsers for many connections, named by the caller's connection ids."""

    def __init__(self) -> None:
        self._collectors: dict[int, _Collector] = {}

    def feed(self, reads: dict[int, bytes], closed: list[int] = ()) -> tuple[dict[int, list[Request]], dict[int, str]]:
        """Parse each connection's new bytes; forget the ``closed`` connections.

        Returns the complete requests per connection and the parse errors per connection (a
        connection with an error is forgotten too: answer it with 400 and close it).
        """
        for conn in closed:
            self._collectors.pop(conn, None)
        requests: dict[int, list[Request]] = {}
        errors: dict[int, str] = {}
        for conn, data in reads.items():
            collector = self._collectors.get(conn)
            if collector is None:
                collector = self._collectors[conn] = _Collector()
            try:
                collector.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                errors[conn] = str(exc) or type(exc).__name__
                del self._collectors[conn]
                continue
            if collector.done:
                requests[conn], collector.done = collector.done, []
        return requests, errors
