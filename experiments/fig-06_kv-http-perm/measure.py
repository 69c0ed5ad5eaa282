"""The benchmark command of fig-06's spaces: the throughput of one configuration, for ``flexos explore``.

``FLEXOS_CONFIG=FILE python measure.py kv|http``: starts the app under ``flexos run -c FILE`` in
a fresh working directory on tmpfs, drives it with the real client (redis-benchmark for kv, wrk
for http), stops its whole process group and prints requests per second as the last line of
stdout (explore's contract). A configuration that cannot run exits 1 and says why on the last
line of stderr, which explore records as the configuration's failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from experiments.common.apps import Variant
from experiments.common.steps import require_tools
from experiments.common.throughput import http_throughput, kv_throughput

TMPFS = Path("/dev/shm")


def failure_line(error: Exception) -> str:
    """Why, in one line that is the same for every configuration failing alike: the app's last words."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", choices=["kv", "http"])
    parser.add_argument("--requests", type=int, default=100_000, help="kv: redis-benchmark -n (100000)")
    parser.add_argument("--seconds", type=int, default=5, help="http: wrk -d, whole seconds (5)")
    args = parser.parse_args()
    config = os.environ.get("FLEXOS_CONFIG")
    if not config:
        raise SystemExit(
            "FLEXOS_CONFIG is not set: flexos explore sets it to the generated flexos.yaml; "
            "by hand: FLEXOS_CONFIG=path/to/flexos.yaml python measure.py kv"
        )
    require_tools(("redis-benchmark", "redis-tools") if args.app == "kv" else ("wrk", "wrk"))
    variant = Variant("explored", Path(config).stem, str(Path(config).resolve()), "explored")
    workdir = Path(tempfile.mkdtemp(prefix=f"fig06-{args.app}-", dir=TMPFS))
    try:
        if args.app == "kv":
            result = kv_throughput(variant, workdir, args.requests)
        else:
            result = http_throughput(variant, workdir, args.seconds)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        print(failure_line(exc), file=sys.stderr)
        sys.exit(1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{result['rps']:.1f}")


if __name__ == "__main__":
    main()
