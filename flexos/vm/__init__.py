"""The ``vm`` mechanism's parts: the guest image (``image``) and what runs inside the guest (``guest``).

The host side (booting QEMU, the warm pool, restarts) is :mod:`flexos.drivers.vm`; the shared-memory
transport both sides speak is :mod:`flexos.transports.ivshmem`.
"""
