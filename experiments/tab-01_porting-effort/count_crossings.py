"""Run an app under a flexos image and count its gate crossings: ``count_crossings.py CONFIG MODULE ARGS...``.

The app runs exactly as ``flexos run -c CONFIG -m MODULE ARGS...`` runs it. Every call that crosses
a gate is served by one ``Link.dispatch``, and every object sent by reference is one
``ExportTable.export``; both are counted with ``sys.monitoring`` (no flexos code is changed). On
SIGUSR1, and at exit, the counts so far are printed as a JSON line ``{"crossings": N, "by_reference": M}``.
For images whose compartments all live in this process (fcalls, strict or not), that is every crossing.
"""

from __future__ import annotations

import atexit
import json
import signal
import sys

import flexos
from flexos.gates.handles import ExportTable
from flexos.gates.link import Link

TOOL = sys.monitoring.PROFILER_ID
COUNTED = {Link.dispatch.__code__: "crossings", ExportTable.export.__code__: "by_reference"}
counts = dict.fromkeys(COUNTED.values(), 0)


def _on_start(code: object, offset: int) -> None:
    counts[COUNTED[code]] += 1


def report(*_: object) -> None:
    print(json.dumps(counts), flush=True)


def main() -> None:
    config, module, *args = sys.argv[1:]
    sys.monitoring.use_tool_id(TOOL, "flexos-crossings")
    sys.monitoring.register_callback(TOOL, sys.monitoring.events.PY_START, _on_start)
    for code in COUNTED:
        sys.monitoring.set_local_events(TOOL, code, sys.monitoring.events.PY_START)
    signal.signal(signal.SIGUSR1, report)
    atexit.register(report)
    flexos.run_module(module, args, config)


if __name__ == "__main__":
    main()
