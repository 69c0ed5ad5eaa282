"""The network stack as the receive loop sees it: listen, accept, receive into fresh buffers."""

from __future__ import annotations

import socket


class Connection:
    """One accepted TCP connection."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes (b"" once the peer has closed)."""
        return self._sock.recv(size)

    def close(self) -> None:
        self._sock.close()


class Listener:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""

    def __init__(self, host: str, port: int, window: int | None = None) -> None:
        self._sock = socket.create_server((host, port))
        if window is not None:  # the receive window of accepted connections, as iperf -w
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        self.address = self._sock.getsockname()[:2]

    def accept(self) -> Connection:
        sock, _ = self._sock.accept()
        return Connection(sock)

    def close(self) -> None:
        self._sock.close()
