"""Reproducible experiments behind the papers' claims: ``mobilenet experiment NAME``.

Each experiment writes into its output folder PNG plots, the numbers as JSON and CSV, and
``report.md``, a short markdown report that says what was measured and whether the
paper's claim was reproduced on this data. ``quick=True`` runs a smaller version (fewer
seeds, epochs or configurations) that finishes in minutes on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MobileNetError

__all__ = ["EXPERIMENTS", "Experiment", "run_experiment"]


@dataclass(frozen=True)
class Experiment:
    name: str
    claim: str  # what it checks, and where the paper says it
    run: Callable[..., dict[str, Any]]


def _manifold(out: Path, quick: bool, **_: Any) -> dict[str, Any]:
    from .manifold import run

    return run(out, quick)


def _tradeoff(out: Path, quick: bool, runs: list[str] | None = None, **_: Any) -> dict[str, Any]:
    from .tradeoff import run

    return run(out, quick, runs or [])


def _bottleneck(out: Path, quick: bool, **options: Any) -> dict[str, Any]:
    from .ablations import run_ablation

    return run_ablation("ablation-bottleneck", out, quick, **options)


def _shortcut(out: Path, quick: bool, **options: Any) -> dict[str, Any]:
    from .ablations import run_ablation

    return run_ablation("ablation-shortcut", out, quick, **options)


def _depthwise(out: Path, quick: bool, **options: Any) -> dict[str, Any]:
    from .ablations import run_ablation

    return run_ablation("depthwise-vs-full", out, quick, **options)


def _memory(out: Path, quick: bool, **_: Any) -> dict[str, Any]:
    from .memory_table import run

    return run(out, quick)


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            "relu-manifold",
            "ReLU destroys a low-dimensional manifold unless it "
            "is embedded in many dimensions (V2 Figure 1)",
            _manifold,
        ),
        Experiment(
            "tradeoff",
            "cost, size and latency across width and resolution multipliers (V1 Figures 4-5)",
            _tradeoff,
        ),
        Experiment(
            "ablation-bottleneck",
            "a linear bottleneck beats a ReLU6 one (V2 Figure 6a)",
            _bottleneck,
        ),
        Experiment(
            "ablation-shortcut",
            "shortcuts between bottlenecks beat shortcuts "
            "between expansions and none (V2 Figure 6b)",
            _shortcut,
        ),
        Experiment(
            "depthwise-vs-full",
            "depthwise separable convolutions cost ~1/8 of "
            "full ones for ~1 point of accuracy (V1 Table 4)",
            _depthwise,
        ),
        Experiment(
            "memory",
            "V2 materialises far less memory than V1 at every resolution (V2 Table 3)",
            _memory,
        ),
    )
}


def run_experiment(name: str, out: str | Path, quick: bool = False, **options: Any) -> dict:
    """Run experiment ``name`` into folder ``out``; a summary of its results."""
    if name not in EXPERIMENTS:
        raise MobileNetError(f"unknown experiment {name!r}; choose from: {', '.join(EXPERIMENTS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MobileNetError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return EXPERIMENTS[name].run(out, quick, **options)
