"""FlexOS's published numbers (ASPLOS'22), with where each comes from.

All are from FlexOS's public artifact repository, project-flexos/asplos22-ae; the paths and
commits below are inside that repository. They are used as ratios to each
system's own baseline only: other hardware, a C unikernel instead of Python.
"""

from __future__ import annotations

# experiments/fig-10_sqlite-exec-time/results/sqlite.dat (commit 73314954): seconds for 5000
# INSERTs, FlexOS NONE 0.054, MPK3 0.106, EPT2 0.173, as ratios to NONE.
SQLITE_RATIOS = [
    ("NONE", 1.0),
    ("MPK3", round(0.106 / 0.054, 2)),  # 1.96
    ("EPT2", round(0.173 / 0.054, 2)),  # 3.20
]

# experiments/fig-09_iperf-throughput/results/iperf.dat (commit 9551943a): Gbit/s per receive
# buffer size, Unikraft baseline and FlexOS builds (labels as in iperf.plot).
IPERF_SIZES = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
IPERF_GBITS = {
    "Unikraft": [0.980, 1.634, 2.876, 2.926, 2.918, 2.884, 2.832, 2.972, 2.842, 2.918, 2.926],
    "FlexOS NONE": [1.056, 1.554, 2.852, 2.998, 3.010, 3.038, 2.996, 3.020, 2.994, 3.044, 3.042],
    "FlexOS MPK2-light": [0.806, 1.214, 2.186, 2.878, 2.962, 2.974, 2.988, 2.946, 2.988, 3.006, 3.016],
    "FlexOS MPK2-dss": [0.798, 1.066, 2.038, 2.930, 2.956, 2.942, 3.008, 3.002, 2.990, 3.010, 3.032],
    "FlexOS EPT2": [0.360, 0.650, 1.072, 1.688, 2.730, 2.770, 2.828, 2.796, 2.836, 2.894, 2.882],
}

# experiments/fig-11_flexos-alloc-latency/latency.plot (commit d99dd594), the labels printed on
# the published figure 11(a): gate latency in cycles.
GATE_CYCLES = [
    ("function call", 5),
    ("MPK-light", 74),
    ("MPK-dss", 135),
    ("EPT", 569),
    ("Linux syscall", 524),
    ("syscall, no KPTI", 109),
]

# experiments/tab-01_porting-effort/README.md: patch size and shared variables per component.
PORTING = [
    ("lwip", "+542/-275", 23),
    ("uksched + ukschedcoop", "+48/-8", 5),
    ("ramfs + vfscore", "+148/-37", 12),
    ("uktime", "+10/-9", 0),
    ("redis", "+279/-90", 16),
    ("nginx", "+470/-85", 36),
    ("sqlite", "+199/-145", 24),
    ("iperf", "+15/-14", 4),
]
