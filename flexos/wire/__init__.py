"""Everything a peer compartment can send: the security-review surface of flexos.

A reviewer reads this package alone to answer "what can another compartment make this process
decode, and what does it build from it?". Nothing here does I/O.

The gate protocol, outermost first:

- ``frames``: the three frames of a link's conversation (CALL, REPLY, ERROR), what each op
  asks and answers, their builders, the index of each field, and ``decode_frame``, which
  validates a whole frame;
- ``operators``: the one table of operators a proxy forwards (wire name, dunder, shape, the
  function the owner applies);
- ``classes``: class descriptions (the answer to DESCRIBE), how an owner builds one and how a
  receiver checks one before mirroring the class;
- ``codec``: values inside frames: msgpack plus flexos's extension types (by value, by
  reference, exceptions), and the reference space a link lends the codec.

Outside gate calls: ``control``: the boot record, the control messages between compartments and
the vm mailbox messages.

What a peer may *reach* through those frames (which attributes, which imports) is the gates'
policy: :mod:`flexos.gates.policy`.
"""
