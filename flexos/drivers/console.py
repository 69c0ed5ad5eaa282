"""A compartment process's stdout and stderr: pipes the app reads and forwards, in the order printed.

A compartment never holds the app's terminal or stdin (it could type into the terminal with
TIOCSTI, or read what was redirected into the app): it starts in a session of its own, with
stdin from /dev/null and stdout and stderr on pipes. The app's :class:`Console` thread copies
what arrives to the app's own descriptors 1 and 2.

Order is kept as it was when the compartment wrote to the app's descriptors itself: the
compartment's ``sys.stdout`` and ``sys.stderr`` (:func:`install_synced_streams`) write to their
pipe, then ask the console over a socket to forward everything written so far, and return once
it has. So whatever the compartment prints while serving a call is on the app's stdout before
the call returns, and the gate call path does no work for it. Bytes written to descriptors 1 and
2 by other means (C code, ``os.write``) are forwarded too, in their own time.
"""

from __future__ import annotations

import io
import os
import select
import socket
import subprocess
import sys
import threading
from typing import Any

_CHUNK = 1 << 16
_SYNC, _SYNCED = b"s", b"k"
#: How long a dying compartment's last words are waited for before its death is reported.
_LAST_WORDS_S = 1.0


class Console:
    """The app's end of one compartment process's stdout and stderr."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._out, self._child_out = os.pipe2(os.O_CLOEXEC)
        self._err, self._child_err = os.pipe2(os.O_CLOEXEC)
        self._sync, self._child_sync = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._drained = threading.Event()
        self._thread: threading.Thread | None = None

    def spawn(self, argv: list[str], pass_fds: tuple[int, ...], env: dict[str, str] | None) -> subprocess.Popen:
        """Start the compartment process (``argv`` gets the sync socket's descriptor number appended):
        a session of its own, stdin from /dev/null, stdout and stderr ours to forward."""
        sync = self._child_sync.fileno()
        try:
            proc = subprocess.Popen(
                [*argv, str(sync)],
                stdin=subprocess.DEVNULL,
                stdout=self._child_out,
                stderr=self._child_err,
                pass_fds=(*pass_fds, sync),
                env=env,
                start_new_session=True,
            )
        except BaseException:
            self.forget()
            raise
        finally:  # the compartment has its ends now, or never will
            os.close(self._child_out)
            os.close(self._child_err)
            self._child_sync.close()
        for fd in (self._out, self._err):
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._forward, daemon=True, name=f"flexos-{self._name}-console")
        self._thread.start()
        return proc

    def _forward(self) -> None:
        """Copy both pipes to our fds 1 and 2; answer each sync once everything before it is copied."""
        targets = {self._out: 1, self._err: 2}
        sync = self._sync.fileno()
        poller = select.poll()
        for fd in (*targets, sync):
            poller.register(fd, select.POLLIN)
        try:
            while targets:
                for fd, _events in poller.poll():
                    if fd == sync:
                        for pipe in list(targets):  # what was written before the sync is in the pipes
                            self._copy(pipe, targets, poller)
                        if not self._answer_sync():
                            poller.unregister(sync)
                    elif fd in targets:
                        self._copy(fd, targets, poller)
        finally:
            self._drained.set()
            self.forget()

    def _answer_sync(self) -> bool:
        """Answer one sync request; False once the compartment's end is closed (or stop() shut ours)."""
        try:
            if self._sync.recv(16):
                self._sync.send(_SYNCED)
                return True
        except OSError:
            pass
        return False

    @staticmethod
    def _copy(fd: int, targets: dict[int, int], poller: select.poll) -> None:
        """Copy what pipe ``fd`` holds now to its target; at its end (the compartment closed it) drop it."""
        while True:
            try:
                data = os.read(fd, _CHUNK)
            except BlockingIOError:
                return
            if not data:
                del targets[fd]
                poller.unregister(fd)
                return
            _write_all(targets[fd], data)

    def wait_drained(self) -> None:
        """Wait briefly for what a dead compartment wrote last, so it comes before the news of its death."""
        self._drained.wait(_LAST_WORDS_S)

    def forget(self) -> None:
        """Drop our descriptors without a word to the other side (also: in a forked child of the app)."""
        for fd in (self._out, self._err):
            if fd >= 0:
                os.close(fd)
        self._out = self._err = -1
        self._sync.close()

    def stop(self) -> None:
        """Forward what is left, then end the forwarding (the compartment has exited or is ending)."""
        try:
            self._sync.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(_LAST_WORDS_S)


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to the app's ``fd``; if the app closed it, the output is dropped as a closed stdout would."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [])
        except OSError:
            return


# -- inside the compartment -----------------------------------------------------------------------
class _SyncedWriter(io.BufferedIOBase):
    """Writes to one of the console's pipes and returns once the app has forwarded it."""

    def __init__(self, fd: int, sync: socket.socket, lock: threading.Lock) -> None:
        super().__init__()
        self._fd = fd
        self._sync = sync
        self._lock = lock

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        with self._lock:
            rest = view
            while rest:
                rest = rest[os.write(self._fd, rest) :]
            try:
                self._sync.send(_SYNC)
                self._sync.recv(16)
            except OSError:  # the app is gone: nobody reads the pipe either
                pass
        return len(view)


def install_synced_streams(sync_fd: int) -> None:
    """Make this compartment's ``sys.stdout`` and ``sys.stderr`` wait for the app to forward each write."""
    sync = socket.socket(fileno=sync_fd)
    os.set_inheritable(sync_fd, False)
    lock = threading.Lock()  # one write at a time: each waits for its own answer
    for name, fd in (("stdout", 1), ("stderr", 2)):
        old = getattr(sys, name)
        stream = io.TextIOWrapper(  # type: ignore[type-var]  # typeshed wants a readable buffer too
            _SyncedWriter(fd, sync, lock),  # it buffers nothing: every write goes out at once
            encoding=old.encoding,
            errors=old.errors,
            write_through=True,
        )
        setattr(sys, name, stream)
