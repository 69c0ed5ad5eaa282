"""``python -m web``: start the HTTP server (loopback only)."""

from __future__ import annotations

import argparse
from pathlib import Path

from web.handler import Site
from web.net import serve
from web.static import StaticFiles


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m web", description="A small HTTP/1.1 catalogue server.")
    parser.add_argument("--port", type=int, default=8099, help="TCP port on 127.0.0.1 (0: any free port; 8099)")
    parser.add_argument(
        "--static", default=str(Path(__file__).with_name("static")), help="directory served under /static/"
    )
    args = parser.parse_args(argv)
    try:
        serve("127.0.0.1", args.port, Site(StaticFiles(args.static)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
