"""relu-manifold: V2 Figure 1, ReLU on a low-dimensional manifold embedded in n dimensions.

A 2-D spiral ``x`` is embedded into n dimensions by a random Gaussian matrix ``T``
(n x 2), passed through ReLU and projected back with the pseudo-inverse of ``T``:
``x_hat = pinv(T) ReLU(T x)``. The panels show ``x_hat`` for each n, as the paper's figure.

What fraction of the spiral survives? ReLU keeps the coordinates of ``T x`` that are
positive; from them ``x`` is recovered exactly (``x = pinv(T_a) ReLU(T x)_a`` over the active
rows ``a``) if and only if the active rows of ``T`` still span the plane (rank 2). That is
the paper's argument (V2 Section 3.2): ReLU preserves the information of its input manifold
when the manifold lies in a low-dimensional subspace of a wider activation space, so that
enough units stay in their linear region. The recovered fraction is the share of spiral
points for which this holds, averaged over ``trials`` random matrices. For n = 2 only the
points with both coordinates positive survive (about a quarter); for n >= 15 essentially
all do. The panels colour the recovered points.

The plain projection ``x_hat`` is not ``x`` even when nothing is lost (ReLU halves the
signal and adds a radial term, both of which ``pinv(T)`` maps back), so the figure's
panels show a distorted spiral for large n, as the paper's do; its error after the best
linear correction is reported too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .common import figure, markdown_table, save_figure, write_csv, write_json, write_text

DIMS = (2, 3, 5, 15, 30)


def spiral(points: int = 1000) -> np.ndarray:
    """An Archimedean spiral around the origin, scaled to [-1, 1]: (points, 2)."""
    t = np.linspace(0.5, 3.5 * np.pi, points)
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
    return x / np.abs(x).max()


def relu_roundtrip(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pinv(T) ReLU(T x)`` for every row of ``x``, and which rows are recoverable."""
    z = x @ t.T
    x_hat = np.maximum(z, 0) @ np.linalg.pinv(t).T
    active = z > 0
    # Recoverable: the rows of T that ReLU keeps span the plane.
    recoverable = np.array([np.linalg.matrix_rank(t[a]) == x.shape[1] for a in active])
    return x_hat, recoverable


def _trials(
    x: np.ndarray, dims: tuple[int, ...], trials: int, rng: np.random.Generator
) -> tuple[
    dict[int, list[float]], dict[int, list[float]], dict[int, tuple[np.ndarray, np.ndarray]]
]:
    """Round-trip ``x`` through ``trials`` random T per n: per n, the recovered fraction and
    the projection error of every trial, and the first trial's ``(x_hat, recoverable)``."""
    fractions: dict[int, list[float]] = {n: [] for n in dims}
    errors: dict[int, list[float]] = {n: [] for n in dims}
    shown: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # Trial-major: this order of draws from rng is what the seeded results depend on.
    for trial in range(trials):
        for n in dims:
            t = rng.standard_normal((n, 2))
            x_hat, recoverable = relu_roundtrip(x, t)
            fractions[n].append(float(recoverable.mean()))
            fit, *_ = np.linalg.lstsq(x_hat, x, rcond=None)
            errors[n].append(float(np.linalg.norm(x_hat @ fit - x, axis=1).mean()))
            if trial == 0:
                shown[n] = (x_hat, recoverable)
    return fractions, errors, shown


def _plot_panels(
    path: Path,
    x: np.ndarray,
    dims: tuple[int, ...],
    shown: dict[int, tuple[np.ndarray, np.ndarray]],
    fractions: dict[int, list[float]],
) -> None:
    """The paper's figure: the spiral, then ``x_hat`` for each n, recoverable points coloured."""
    fig, axes = figure(ncols=len(dims) + 1, size=(3.0, 3.2))
    panels = axes[0]
    panels[0].scatter(x[:, 0], x[:, 1], s=2, c=np.arange(len(x)), cmap="viridis")
    panels[0].set_title("input (2-D spiral)")
    for ax, n in zip(panels[1:], dims, strict=True):
        x_hat, ok = shown[n]
        ax.scatter(x_hat[~ok, 0], x_hat[~ok, 1], s=2, c="tab:red", label="lost")
        ax.scatter(x_hat[ok, 0], x_hat[ok, 1], s=2, c="tab:blue", label="recoverable")
        ax.set_title(f"n = {n}: {100 * np.mean(fractions[n]):.0f}% recovered")
    for ax in panels:
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    panels[-1].legend(loc="lower right", markerscale=4, fontsize=8)
    fig.suptitle("pinv(T) ReLU(T x) for a random n x 2 matrix T (V2 Figure 1)", y=1.06)
    save_figure(fig, path)


def _plot_fraction(
    path: Path, dims: tuple[int, ...], rows: list[dict[str, Any]], trials: int
) -> None:
    """The recovered fraction against n, with its spread over the random matrices."""
    fig, axes = figure(size=(5.0, 3.8))
    ax = axes[0][0]
    ax.errorbar(
        dims,
        [r["recovered_fraction"] for r in rows],
        yerr=[r["recovered_std"] for r in rows],
        marker="o",
        capsize=3,
    )
    ax.set_xscale("log")
    ax.set_xticks(dims, [str(n) for n in dims])
    ax.set_xlabel("embedding dimension n (log scale)")
    ax.set_ylabel("fraction of the spiral recovered")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"ReLU keeps the manifold in wide layers ({trials} random T each)")
    save_figure(fig, path)


def _report(
    path: Path,
    dims: tuple[int, ...],
    rows: list[dict[str, Any]],
    recovered: dict[str, float],
    trials: int,
    points: int,
) -> bool:
    """Write report.md; return whether the paper's trend is reproduced."""
    trend = recovered[str(dims[0])] < min(recovered[str(n)] for n in dims if n >= 15)
    table = markdown_table(
        ["n", "recovered (mean)", "std", "projection error"],
        [
            [r["n"], r["recovered_fraction"], r["recovered_std"], r["projection_error"]]
            for r in rows
        ],
    )
    report = f"""# relu-manifold (MobileNetV2 Figure 1)

A 2-D spiral of {points} points embedded into n dimensions by a random Gaussian matrix T,
ReLU, projected back with pinv(T); {trials} random matrices per n. A point counts as
recovered when the rows of T that ReLU keeps active still span the plane, so the point is
exactly recoverable from the ReLU output.

{table}

The paper's trend ({"reproduced" if trend else "NOT reproduced"}): in 2 dimensions ReLU
destroys most of the manifold ({100 * recovered[str(dims[0])]:.0f}% survives); embedded in 15
or more dimensions practically all of it survives. "projection error" is the mean distance
between the spiral and pinv(T) ReLU(T x) after the best linear correction (spiral radius 1).

![panels](relu_manifold.png)
![fraction](relu_manifold_fraction.png)
"""
    write_text(path, report)
    return trend


def run(
    out: Path, quick: bool = False, dims: tuple[int, ...] = DIMS, seed: int = 0
) -> dict[str, Any]:
    trials = 10 if quick else 50
    rng = np.random.default_rng(seed)
    x = spiral(500 if quick else 1000)
    fractions, errors, shown = _trials(x, dims, trials, rng)
    rows = [
        {
            "n": n,
            "recovered_fraction": round(float(np.mean(fractions[n])), 4),
            "recovered_std": round(float(np.std(fractions[n])), 4),
            "projection_error": round(float(np.mean(errors[n])), 4),
        }
        for n in dims
    ]
    recovered = {str(r["n"]): r["recovered_fraction"] for r in rows}
    _plot_panels(out / "relu_manifold.png", x, dims, shown, fractions)
    _plot_fraction(out / "relu_manifold_fraction.png", dims, rows, trials)
    write_json(out / "recovered.json", recovered)
    write_json(out / "results.json", {"trials": trials, "points": len(x), "rows": rows})
    write_csv(out / "results.csv", rows)
    trend = _report(out / "report.md", dims, rows, recovered, trials, len(x))
    return {"recovered": recovered, "trend_reproduced": bool(trend)}
