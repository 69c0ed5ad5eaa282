"""sqlbench: INSERTs through the stdlib sqlite3, each INSERT its own transaction.

Run it with ``python -m sqlbench`` from this directory (``--help`` for the options).
"""
