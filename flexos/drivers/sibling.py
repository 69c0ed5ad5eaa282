"""How a compartment process reaches a sibling compartment: through the default compartment.

Only the default compartment boots compartments, so it brokers: asked by compartment B for
compartment X, it boots X if needed and hands B and X the two ends of a fresh socketpair, over
which they then open shared-memory channels exactly as the process driver does. If X dies, B's
link breaks and the next use asks again, so restarts work as for any other driver.
"""

from __future__ import annotations

from flexos.drivers.base import Driver
from flexos.errors import CompartmentCrashed
from flexos.gates.link import Link
from flexos.transports.shm import ShmTransport


class SiblingDriver(Driver):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._transport: ShmTransport | None = None

    def start(self, mirrors: dict) -> Link:
        name = self.spec.name
        sock = self.host.request_sibling(name)
        link = self.make_link(mirrors)
        self._transport = ShmTransport(
            sock,
            sock.fileno(),
            0,  # only hang-ups: the sibling dying closes its end
            death=lambda: CompartmentCrashed(name, None, "the connection to it was lost"),
            spin_us=self.options.spin_us,
        )
        self._transport.run(link, name=f"flexos-{name}")
        return link

    def forget(self) -> bool:
        if self._transport is not None:
            self._transport.abandon()
            self._transport = None
        return True

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
