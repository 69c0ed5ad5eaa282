"""The ``vm`` mechanism's parts: the guest image (``image``), the machine seen from the host
(``machine``: QEMU, the window, the agent, the pool) and what runs inside the guest (``guest``).

The driver (:mod:`flexos.drivers.vm`) only dispatches to these; the shared-memory transport both
sides speak is :mod:`flexos.transports.ivshmem`.
"""
