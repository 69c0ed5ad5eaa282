"""Where the repository's parts are, seen from the experiments."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APPS = REPO / "apps"
PYTHON = sys.executable
FLEXOS = str(Path(sys.executable).with_name("flexos"))
