"""``python -m flexos.trace OUT.json [-m MODULE | SCRIPT] [ARGS]...``: one learning run (``flexos trace`` starts it)."""

from flexos.trace.recorder import main

if __name__ == "__main__":
    main()
