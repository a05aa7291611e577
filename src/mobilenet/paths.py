"""Where the toolkit keeps what it fetches or generates: one cache folder."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """``$MOBILENET_HOME``, or ``~/.cache/mobilenet``: downloaded checkpoints, exported
    ONNX files, generated datasets."""
    return Path(os.environ.get("MOBILENET_HOME", Path.home() / ".cache" / "mobilenet"))
