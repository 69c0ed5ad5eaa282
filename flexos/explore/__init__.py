"""``flexos explore``: the safest configurations of a space whose performance meets a budget.

The pieces (docs/explore.md): ``space`` reads the ``explore:`` section and enumerates the
configurations; ``order`` orders them by safety; ``search`` decides which to measure and infers
the rest; ``runner`` has an engine (``engines``: here, or on a Ray cluster) run the benchmark
command (cached, resumable); ``report`` writes the table, CSV, JSON and figures; ``exploration``
puts them together.

A lazy facade (PEP 562), like flexos's own: a cluster host that runs a benchmark imports
``flexos.explore.engines`` without the search's numpy or the report's matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexos.explore.engines import BenchmarkFailed, Engine, make_engine
    from flexos.explore.exploration import (
        Exploration,
        default_out,
        explore,
        listing,
        refusals,
        resume_hint,
        settle,
    )
    from flexos.explore.space import load_space

# Public name -> the module that defines it, imported when the name is first used.
_LAZY = {
    "BenchmarkFailed": "flexos.explore.engines",
    "Engine": "flexos.explore.engines",
    "make_engine": "flexos.explore.engines",
    "Exploration": "flexos.explore.exploration",
    "default_out": "flexos.explore.exploration",
    "explore": "flexos.explore.exploration",
    "listing": "flexos.explore.exploration",
    "refusals": "flexos.explore.exploration",
    "resume_hint": "flexos.explore.exploration",
    "settle": "flexos.explore.exploration",
    "load_space": "flexos.explore.space",
}
__all__ = [
    "BenchmarkFailed",
    "Engine",
    "Exploration",
    "default_out",
    "explore",
    "listing",
    "load_space",
    "make_engine",
    "refusals",
    "report",
    "resume_hint",
    "settle",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flexos.explore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
