"""Entry point of a compartment process: ``python -m flexos.runtime.child FD``.

Receives its identity and the image over the control socket, applies the compartment's
hardening (flexos/hardening.py) before any component code can run, installs the gates for
modules that live elsewhere, answers "ready", then serves the channels its parent opens until the
parent goes away. It imports none of the config/validation stack.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any

import msgpack

from flexos import hardening
from flexos.errors import CompartmentCrashed
from flexos.image import Image

if TYPE_CHECKING:
    from flexos.gates.link import Link
    from flexos.runtime import Runtime


def _die_with_parent() -> None:
    """Exit when the parent process does (PR_SET_PDEATHSIG would fire when the parent *thread*
    that spawned us exits, and compartments are spawned from whichever thread imports first)."""
    parent = os.getppid()
    try:
        pidfd = os.pidfd_open(parent)
    except OSError:
        os._exit(1)
    if os.getppid() != parent:  # it died before we could watch it
        os._exit(1)

    def watch() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="flexos-parent-watch").start()


def link_back(image: Image, name: str, transport: Any) -> tuple[Runtime, Link]:
    """Compartment ``name``'s runtime, linked to the default compartment over ``transport``, gates installed."""
    from flexos.gates.link import Link
    from flexos.runtime import Runtime

    runtime = Runtime(image, local=name)
    parent = Link(image.default, importer=runtime.serve_import, replicated=image.is_replicated)
    parent.attach(transport)
    runtime.connect(image.default, parent, transport)
    runtime.start()
    return runtime, parent


def main() -> None:
    from flexos.transports.shm import ShmTransport

    sock = socket.socket(fileno=int(sys.argv[1]))
    os.set_inheritable(sock.fileno(), False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the app, which sees it first
    boot = msgpack.unpackb(sock.recv(1 << 20))
    try:
        image = Image.from_dict(boot["image"])
        name = boot["name"]
        policy = image.compartments[name].hardening
        sys.path[:] = boot["sys_path"]
        sys.argv[:] = boot["argv"]
        # Namespaces, Landlock and seccomp bind only the calling thread: all go before any thread.
        filter_policy = hardening.seccomp_policy(policy)
        seccomp = hardening.seccomp_library() if filter_policy is not None else None
        if policy.get("network") == "none":
            hardening.isolate_network()
        if policy.get("filesystem") is not None:
            hardening.restrict_filesystem(policy["filesystem"]["read"], policy["filesystem"]["write"])
        if filter_policy is not None:
            hardening.apply_seccomp(filter_policy, seccomp)
        _die_with_parent()
        hardening.apply_limits(policy.get("limits") or {})
        transport = ShmTransport(
            sock,
            sock.fileno(),
            0,
            death=lambda: CompartmentCrashed(image.default, None, "the app went away"),
            spin_us=boot["spin_us"],
        )
        runtime, parent = link_back(image, name, transport)
        libraries = {
            module: rules["audit"]["deny"]
            for module, rules in image.library_hardening.items()
            if image.compartment_of(module) == name
        }
        hardening.install_audit_policy((policy.get("audit") or {}).get("deny", []), name, libraries)  # last
    except Exception:
        sock.send(msgpack.packb(["error", traceback.format_exc()]))
        os._exit(1)
    sock.send(msgpack.packb(["ready"]))
    transport.accept_loop(parent, lambda message, fds: runtime.control(image.default, message, fds))
    os._exit(0)


if __name__ == "__main__":
    main()
