"""Figures: matplotlib without a display, saved as PNG and SVG side by side."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after choosing the backend

# One colour per configuration kind, the same in every figure.
COLORS = {
    "none": "#4d4d4d",
    "fcalls": "#66a182",
    "strict": "#a2d9d1",
    "subinterp": "#7f95d1",
    "process": "#d18282",
    "process-hardened": "#8c2d2d",
    "flexos-paper": "#c9a227",
}


def wrap(label: str) -> str:
    """A bar label on two lines where it has a ' + '."""
    return label.replace(" + ", " +\n")


def save(figure: plt.Figure, out: Path, name: str) -> None:
    figure.tight_layout()
    for suffix in ("png", "svg"):
        path = out / f"{name}.{suffix}"
        figure.savefig(path, dpi=130)
        print(f"wrote {path}")
    plt.close(figure)
