"""iperf: a TCP receive-throughput server (the receiving end of ``iperf -c``).

- ``iperf.netstack``: the network stack the server receives through (sockets);
- ``iperf.server``: the receive loop: it asks the stack for up to ``--recv-size`` bytes at a
  time and counts them, as an iperf server asks its TCP/IP stack.

Run it with ``python -m iperf`` from this directory (``--help`` for the options).
"""
