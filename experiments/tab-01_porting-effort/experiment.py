"""FlexOS table 1, on Python: what it takes to run each reference app under flexos.

Per app: its size, the lines of it that had to change (or even mention flexos) to run under flexos,
its configurations, and — measured while a real client drives it under its ``strict`` image, where
every component sits in a compartment of its own — the gate crossings and by-reference objects per
request. FlexOS's patch sizes and shared-variable counts are printed beside.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import tempfile
from pathlib import Path

from experiments.common import paper
from experiments.common.apps import MODULES, AppProcess, Variant, refusal, run_to_end
from experiments.common.clients import iperf_send, redis_benchmark, wrk
from experiments.common.paths import APPS
from experiments.common.plotting import plt, save
from experiments.common.steps import Context, main, require_tools
from experiments.common.tables import print_table, read_csv, write_csv

FOLDER = Path(__file__).resolve().parent
LAUNCHER = FOLDER / "count_crossings.py"
STRICT = Variant("strict", "strict (every component separate, one process)", "strict.yaml", "strict")
COUNTS = re.compile(r'^\{"crossings": \d+, "by_reference": \d+\}$')
# FlexOS's ported application for each of ours (tab-01 rows).
FLEXOS_ROW = {"kv": "redis", "http": "nginx", "sqlite": "sqlite", "iperf": "iperf"}


def plan(context: Context) -> dict[str, int | float]:
    if context.smoke:
        return {"kv_requests": 2000, "http_seconds": 1, "sqlite_inserts": 50, "iperf_seconds": 0.3}
    return {"kv_requests": 50_000, "http_seconds": 5, "sqlite_inserts": 1000, "iperf_seconds": 1}


def prepare(context: Context) -> None:
    require_tools(("redis-benchmark", "redis-tools"), ("wrk", "wrk"), ("iperf", "iperf"))
    for app in MODULES:
        reason = refusal(app, STRICT)
        if reason is not None:
            raise SystemExit(f"apps/{app}/configs/strict.yaml cannot run here: {reason}")
        print(f"  {app:<7} strict image ok")


def code_lines(app: str) -> tuple[int, int]:
    """(non-blank, non-comment lines of the app's Python code, those of them that mention flexos)."""
    total = mentions = 0
    for path in sorted((APPS / app / MODULES[app]).rglob("*.py")):
        for line in path.read_text().splitlines():
            if line.strip() and not line.strip().startswith("#"):
                total += 1
                mentions += "flexos" in line.lower()
    return total, mentions


def config_lines(app: str) -> tuple[int, int]:
    """(configuration files, their non-blank non-comment lines)."""
    files = sorted((APPS / app / "configs").glob("*.yaml"))
    lines = sum(1 for f in files for line in f.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return len(files), lines


def _snapshot(server: AppProcess) -> tuple[dict[str, int], int]:
    """Ask the launcher for its counts; return them and the index of the next output line."""
    start = len(server.lines)
    server.proc.send_signal(signal.SIGUSR1)
    counts = json.loads(server.wait_for_line(COUNTS, timeout=30, start=start).group(0))
    return counts, len(server.lines)


def measure_server(app: str, args: list[str], drive, workdir: Path) -> tuple[float, dict[str, int]]:
    """Start the app's strict image, drive it with a real client; (requests, counts during the drive)."""
    with AppProcess(app, STRICT, ["--port", "0", *args], workdir, LAUNCHER) as server:
        port = server.wait_listening()
        before, _ = _snapshot(server)
        requests = drive(port, server)
        after, _ = _snapshot(server)
    return requests, {key: after[key] - before[key] for key in after}


def measure(app: str, context: Context, workdir: Path) -> list[dict]:
    """Rows of (workload, requests, crossings, by-reference sends) for one app."""
    size = plan(context)
    rows = []
    if app == "kv":
        for pipeline in (16, 1):
            n = int(size["kv_requests"]) // (1 if pipeline == 16 else 4)

            def drive(port: int, server: AppProcess, n: int = n, pipeline: int = pipeline) -> int:
                redis_benchmark(port, requests=n, pipeline=pipeline)
                return 2 * n  # -t get,set: n of each

            requests, counts = measure_server(app, ["--persistence", "aof"], drive, workdir)
            rows.append((f"redis-benchmark -c 30 -P {pipeline} -t get,set", requests, counts))
    elif app == "http":
        for path in ("/", "/static/index.html"):

            def drive(port: int, server: AppProcess, path: str = path) -> int:
                return wrk(port, path, seconds=size["http_seconds"])["requests"]

            requests, counts = measure_server(app, [], drive, workdir)
            rows.append((f"wrk -c 30 {path}", requests, counts))
    elif app == "sqlite":
        small, large = 100, 100 + int(size["sqlite_inserts"])
        totals = []
        for n in (small, large):
            lines = run_to_end(app, STRICT, ["--inserts", str(n)], workdir, timeout=600, launcher=LAUNCHER)
            totals.append(json.loads([line for line in lines if COUNTS.match(line)][-1]))
        counts = {key: totals[1][key] - totals[0][key] for key in totals[0]}
        rows.append((f"INSERTs ({large} minus {small})", large - small, counts))
    elif app == "iperf":

        def drive(port: int, server: AppProcess) -> int:
            iperf_send(port, size["iperf_seconds"], 128 * 1024)
            report = server.wait_for_line(re.compile(r'^\{"bytes".*\}$'), timeout=300)
            return json.loads(report.group(0))["recv_calls"] + 1  # + the receive that saw the end

        requests, counts = measure_server(app, ["--recv-size", "1024"], drive, workdir)
        rows.append(("iperf -c, 1 KiB receives", requests, counts))
    return [
        {
            "app": app,
            "workload": workload,
            "requests": requests,
            "crossings": counts["crossings"],
            "crossings_per_request": f"{counts['crossings'] / requests:.3f}",
            "by_reference_per_request": f"{counts['by_reference'] / requests:.3f}",
        }
        for workload, requests, counts in rows
    ]


def run(context: Context) -> None:
    require_tools(("redis-benchmark", "redis-tools"), ("wrk", "wrk"), ("iperf", "iperf"))
    effort = []
    traffic = []
    workdir = Path(tempfile.mkdtemp(prefix="tab01-", dir="/dev/shm"))
    try:
        for app in MODULES:
            lines, mentions = code_lines(app)
            configs, yaml_lines = config_lines(app)
            flexos_name = FLEXOS_ROW[app]
            patch, shared = next((p, s) for name, p, s in paper.PORTING if name == flexos_name)
            effort.append(
                {
                    "app": app,
                    "app_lines": lines,
                    "lines_changed_for_flexos": 0,
                    "lines_mentioning_flexos": mentions,
                    "configs": configs,
                    "config_lines": yaml_lines,
                    "declared_shared": 0,
                    "flexos_paper_app": flexos_name,
                    "flexos_paper_patch": patch,
                    "flexos_paper_shared_variables": shared,
                }
            )
            measured = measure(app, context, workdir / app)
            traffic += measured
            for row in measured:
                print(f"  {app:<7} {row['workload']:<48} {row['crossings_per_request']:>8} crossings/request")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    write_csv(context.out / "tab-01_effort.csv", effort)
    write_csv(context.out / "tab-01_crossings.csv", traffic)


def plot(context: Context) -> None:
    effort = read_csv(context.out / "tab-01_effort.csv")
    traffic = read_csv(context.out / "tab-01_crossings.csv")
    effort_header = [
        "app",
        "app lines",
        "changed",
        "mention flexos",
        "configs (lines)",
        "declared shared",
        "FlexOS patch (shared)",
    ]
    effort_rows = [
        [
            e["app"],
            e["app_lines"],
            e["lines_changed_for_flexos"],
            e["lines_mentioning_flexos"],
            f"{e['configs']} ({e['config_lines']})",
            e["declared_shared"],
            f"{e['flexos_paper_app']}: {e['flexos_paper_patch']} ({e['flexos_paper_shared_variables']})",
        ]
        for e in effort
    ]
    traffic_header = ["app", "workload (strict image)", "requests", "crossings/request", "by-reference/request"]
    traffic_rows = [
        [t["app"], t["workload"], t["requests"], t["crossings_per_request"], t["by_reference_per_request"]]
        for t in traffic
    ]
    print_table(effort_header, effort_rows)
    print()
    print_table(traffic_header, traffic_rows)
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(12, 5.5))
    for axis, header, rows, title in (
        (top, effort_header, effort_rows, "Porting effort (lines of the app changed to run under flexos)"),
        (bottom, traffic_header, traffic_rows, "Gate crossings per request, measured with real clients"),
    ):
        axis.axis("off")
        table = axis.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.4)
        axis.set_title(title)
    save(figure, context.out, "tab-01_porting-effort")


if __name__ == "__main__":
    main(__doc__.splitlines()[0], prepare, run, plot, FOLDER)
