"""Page rendering with jinja2 (autoescaping on), from the templates next to this module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    auto_reload=False,
)


def render(name: str, context: dict[str, Any]) -> str:
    """The template ``name`` rendered with ``context``."""
    return _environment.get_template(name).render(context)
