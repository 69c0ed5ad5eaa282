"""kv: a Redis-protocol (RESP) key-value server built from separately placeable components.

- ``kv.net``: the network front end (an asyncio TCP server; one parser per connection);
- ``kv.resp``: the protocol parser (hiredis, Redis's own C parser): bytes in, complete commands out;
- ``kv.store``: the command logic and the in-memory store: a batch of commands in, RESP replies out;
- ``kv.persist``: persistence of write commands (an append-only file, or sqlite3).

Run it with ``python -m kv`` from this directory (``--help`` for the options).
"""
