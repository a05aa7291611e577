"""The curves of a training run, as a PNG of side-by-side panels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write


@dataclass
class Panel:
    """One plot: ``series`` maps a legend label to its (epochs, values)."""

    title: str
    ylabel: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    ylim: tuple[float, float] | None = None


def plot_panels(panels: Sequence[Panel], path: Path, title: str) -> None:
    """Draw ``panels`` side by side against the epoch, and write the PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in panel.series.items():
            ax.plot(xs, ys, "o-", label=label)
        ax.set(xlabel="epoch", ylabel=panel.ylabel, title=panel.title)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss and top-1 accuracy of a classification run, training and validation."""
    epochs = [r["epoch"] for r in rows]
    loss = Panel("loss", "cross-entropy loss", {"train": (epochs, [r["train_loss"] for r in rows])})
    acc = Panel(
        "accuracy", "top-1 accuracy (%)", {"train": (epochs, [r["train_top1"] for r in rows])}
    )
    if rows and rows[0].get("val_loss") is not None:
        loss.series["validation"] = (epochs, [r["val_loss"] for r in rows])
        acc.series["validation"] = (epochs, [r["val_top1"] for r in rows])
    plot_panels([loss, acc], path, title)
