"""What every experiment writes: JSON, CSV, PNG plots and a markdown report, atomically.

``write_json`` and ``write_csv`` are :mod:`mobilenet.fileio`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write, write_csv, write_json

__all__ = [
    "figure",
    "markdown_table",
    "save_figure",
    "write_csv",
    "write_json",
    "write_text",
]


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def save_figure(fig, path: Path) -> Path:
    """Save a matplotlib figure as PNG (150 dpi) and close it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    plt.close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.5)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
