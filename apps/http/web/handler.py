"""The application: routes each request to a rendered page or a static file.

``Site.respond`` takes the requests of many connections at once and returns their responses as
``(status, content type, body)``; writing them out is the front end's job.
"""

from __future__ import annotations

from typing import Protocol
from urllib.parse import unquote, urlsplit

from web import templates
from web.parser import Request

Response = tuple[int, str, bytes]
HTML = "text/html; charset=utf-8"


class Files(Protocol):
    def read(self, relative: str) -> tuple[bytes, str] | None: ...


class Site:
    """A small catalogue site: ``/`` (a rendered page), ``/item/N``, ``/static/...``."""

    def __init__(self, files: Files, items: int = 25) -> None:
        self.files = files
        self.items = [{"id": i, "name": f"item <{i}>", "price": round(1.5 * i + 0.99, 2)} for i in range(items)]

    def respond(self, requests: dict[int, list[Request]]) -> dict[int, list[Response]]:
        """The responses, per connection, to its requests in order."""
        return {conn: [self._respond(request) for request in batch] for conn, batch in requests.items()}

    def _respond(self, request: Request) -> Response:
        method, target, headers, _body, _keep_alive = request
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        path = unquote(urlsplit(target).path)
        if path == "/":
            page = templates.render("index.html", {"items": self.items, "agent": headers.get("user-agent", "")})
            return 200, HTML, page.encode()
        if path.startswith("/item/") and path[6:].isdigit() and int(path[6:]) < len(self.items):
            page = templates.render("item.html", {"item": self.items[int(path[6:])]})
            return 200, HTML, page.encode()
        if path.startswith("/static/"):
            found = self.files.read(path[len("/static/") :])
            if found is not None:
                return 200, found[1], found[0]
        return 404, "text/plain", b"not found\n"
