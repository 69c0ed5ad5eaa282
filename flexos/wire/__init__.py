"""Everything a peer compartment can send: the security-review surface of flexos.

A reviewer reads this package alone to answer "what can another compartment make this process
decode, and what does it build from it?". Nothing here does I/O.
"""
