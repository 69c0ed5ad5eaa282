"""Static files from one directory; nothing outside it can be named."""

from __future__ import annotations

import mimetypes
from pathlib import Path


class StaticFiles:
    """Files under ``root``, by their path relative to it."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).resolve()

    def read(self, relative: str) -> tuple[bytes, str] | None:
        """``(contents, content type)`` of the file, or None if there is no such file under the root."""
        path = (self.root / relative.lstrip("/")).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.read_bytes(), content_type
