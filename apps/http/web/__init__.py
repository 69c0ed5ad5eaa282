"""web: an HTTP/1.1 server built from separately placeable components.

- ``web.net``: the network front end (asyncio), which also writes the responses;
- ``web.parser``: the request parser (httptools, i.e. llhttp, Node.js's C parser): bytes in,
  complete requests out;
- ``web.handler``: the application: routes requests to pages and files;
- ``web.templates``: page rendering with jinja2;
- ``web.static``: static files from a directory.

Run it with ``python -m web`` from this directory (``--help`` for the options).
"""
