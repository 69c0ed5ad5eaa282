"""``python -m flexos.trace OUT.json [-m MODULE | SCRIPT] [ARGS]...``: one learning run (what ``flexos trace`` starts)."""

from flexos.trace.recorder import main

main()
