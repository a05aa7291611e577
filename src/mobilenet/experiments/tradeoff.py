"""tradeoff: cost, size, latency (and accuracy) across width and resolution multipliers.

V1 Figures 4-5 plot ImageNet accuracy against MAdds and parameters for the 16 models of
width multipliers {1, 0.75, 0.5, 0.25} x resolutions {224, 192, 160, 128}: accuracy falls
off smoothly with cost until the smallest models. Here every family (V1, V2, V3-Large,
V3-Small) is measured over widths 0.25-1.4 and resolutions 96-224: MAdds and parameters
from the cost model (1000 classes), and the batch-1 latency of the fastest CPU engine of
``mobilenet bench`` (ONNX Runtime, one thread, median of repeated calls, in this process).
Given training run folders (``--runs``), their validation accuracy is plotted against
their MAdds too.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import MobileNetError
from .common import figure, markdown_table, save_figure, write_csv, write_json, write_text

FAMILIES = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
LABELS = {
    "mobilenet_v1": "V1",
    "mobilenet_v2": "V2",
    "mobilenet_v3_large": "V3-Large",
    "mobilenet_v3_small": "V3-Small",
}
WIDTHS = (0.25, 0.5, 0.75, 1.0, 1.4)
RESOLUTIONS = (96, 128, 160, 192, 224)


def latency_ms(model: str, width: float, resolution: int, calls: int, threads: int = 1) -> float:
    """Median batch-1 latency with ONNX Runtime, the engine ``mobilenet predict`` uses."""
    from ..bench import BenchConfig, build_engine

    with tempfile.TemporaryDirectory() as tmp:
        run = build_engine(
            "onnxruntime", BenchConfig(model, width, 1, resolution, threads), Path(tmp)
        )
        for _ in range(3):
            run()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(
    quick: bool,
    families: tuple[str, ...] = FAMILIES,
    widths: tuple[float, ...] | None = None,
    resolutions: tuple[int, ...] | None = None,
) -> list[dict[str, Any]]:
    """Params, MAdds and latency of every (family, width, resolution)."""
    from ..cost import cost
    from ..models import create_model

    widths = widths or ((0.5, 1.0) if quick else WIDTHS)
    resolutions = resolutions or ((128, 224) if quick else RESOLUTIONS)
    rows = []
    for family in families:
        for width in widths:
            model = create_model(family, width_mult=width)
            for resolution in resolutions:
                c = cost(model, resolution)
                rows.append(
                    {
                        "model": family,
                        "width_mult": width,
                        "resolution": resolution,
                        "params": c.params,
                        "madds": c.madds,
                        "latency_ms": round(
                            latency_ms(family, width, resolution, 10 if quick else 30), 3
                        ),
                    }
                )
    return rows


def run_accuracy(folders: list[str]) -> list[dict[str, Any]]:
    """Accuracy and cost of finished training runs (``mobilenet train`` output folders)."""
    from ..cost import cost
    from ..models import create_model

    rows = []
    for folder in folders:
        path = Path(folder)
        try:
            config = json.loads((path / "config.json").read_text())
            summary = json.loads((path / "summary.json").read_text())
        except (OSError, ValueError) as e:
            raise MobileNetError(f"{folder}: not a finished training run ({e})") from None
        train, recipe = config["train"], config["recipe"]
        model = create_model(
            train["model"], width_mult=train["width_mult"], num_classes=len(train["classes"])
        )
        rows.append(
            {
                "run": str(path),
                "model": train["model"],
                "width_mult": train["width_mult"],
                "resolution": recipe["resolution"],
                "madds": cost(model, recipe["resolution"]).madds,
                "top1": summary["best_val_top1"],
            }
        )
    return rows


def _plot_cost(path: Path, rows: list[dict[str, Any]]) -> None:
    """Latency and parameters against MAdds, one series per family."""
    fig, axes = figure(ncols=2, size=(6.5, 5.0))
    for ax, (key, label) in zip(
        axes[0],
        (
            ("latency_ms", "latency at batch 1 (ms, ONNX Runtime, 1 thread)"),
            ("params", "parameters"),
        ),
        strict=True,
    ):
        for family in FAMILIES:
            mine = [r for r in rows if r["model"] == family]
            ax.scatter(
                [r["madds"] / 1e6 for r in mine],
                [r[key] for r in mine],
                s=[20 + 40 * r["width_mult"] for r in mine],
                alpha=0.75,
                label=LABELS[family],
            )
            for r in mine:
                if r["resolution"] == max(x["resolution"] for x in mine):
                    ax.annotate(
                        f"{r['width_mult']:g}",
                        (r["madds"] / 1e6, r[key]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("multiply-adds (millions, log scale)")
        ax.set_ylabel(f"{label} (log scale)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(title="marker size: width", fontsize=8)
    axes[0][0].set_title("latency against MAdds (labels: width at the largest resolution)")
    axes[0][1].set_title("parameters against MAdds (resolution moves along x only)")
    save_figure(fig, path)


def _plot_accuracy(path: Path, accuracy: list[dict[str, Any]]) -> None:
    """Validation top-1 of the training runs against their MAdds (V1 Figure 4)."""
    fig, axes = figure(size=(6.0, 4.5))
    ax = axes[0][0]
    for family in FAMILIES:
        mine = [r for r in accuracy if r["model"] == family]
        if mine:
            ax.scatter(
                [r["madds"] / 1e6 for r in mine],
                [r["top1"] for r in mine],
                label=LABELS[family],
            )
            for r in mine:
                ax.annotate(
                    f"{r['width_mult']:g}-{r['resolution']}",
                    (r["madds"] / 1e6, r["top1"]),
                    fontsize=7,
                )
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds (millions, log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("accuracy against MAdds (labels: width-resolution)")
    save_figure(fig, path)


def _scaling_table(rows: list[dict[str, Any]]) -> str:
    """Each family's full model: its cost, and how its MAdds scale with width (~ alpha^2)
    and resolution (~ rho^2), as V1 Sections 3.3-3.4 predict."""
    ref = {(r["model"], r["width_mult"], r["resolution"]): r for r in rows}
    lo_res = min(r["resolution"] for r in rows)
    scaling = []
    for family in FAMILIES:
        full = ref[(family, 1.0, 224)]
        half = ref[(family, 0.5, 224)]
        small = ref[(family, 1.0, lo_res)]
        scaling.append(
            [
                LABELS[family],
                f"{full['madds'] / 1e6:.1f}M",
                f"{full['params'] / 1e6:.2f}M",
                f"{full['latency_ms']:.2f}",
                f"{100e6 * full['latency_ms'] / full['madds']:.2f}",
                f"{half['madds'] / full['madds']:.2f}",
                f"{small['madds'] / full['madds']:.2f} (rho^2 = {(lo_res / 224) ** 2:.2f})",
            ]
        )
    return markdown_table(
        [
            "model",
            "MAdds (1.0-224)",
            "params",
            "latency ms",
            "ms per 100M MAdds",
            "MAdds x0.5 width",
            f"MAdds at {lo_res}",
        ],
        scaling,
    )


def _report(path: Path, rows: list[dict[str, Any]], with_accuracy: bool) -> None:
    """Write report.md: the configurations measured and how their cost scales."""
    table = _scaling_table(rows)
    text = f"""# tradeoff (MobileNetV1 Figures 4-5)

{len(rows)} configurations: {", ".join(LABELS.values())} at widths
{sorted({r["width_mult"] for r in rows})} and resolutions {sorted({r["resolution"] for r in rows})}.
MAdds and parameters from `mobilenet cost` (1000 classes); latency: ONNX Runtime, batch 1,
1 thread, median, measured in one process one configuration after another (a shared
machine: read latencies as +-10%).

{table}

The width multiplier scales MAdds by about alpha^2 and the resolution multiplier by rho^2
(V1 Sections 3.3-3.4); resolution leaves the parameters unchanged. Latency follows MAdds
only loosely: "ms per 100M MAdds" is what one MAdd costs in each family (depthwise
convolutions, squeeze-excite and h-swish do little arithmetic per byte moved).

![tradeoff](tradeoff.png)
"""
    if with_accuracy:
        text += "\n![accuracy](accuracy.png)\n"
    write_text(path, text)


def run(out: Path, quick: bool = False, runs: list[str] | None = None) -> dict[str, Any]:
    accuracy = run_accuracy(runs or [])
    rows = measure(quick)
    write_csv(out / "results.csv", rows)
    write_json(
        out / "results.json",
        {"engine": "onnxruntime", "threads": 1, "rows": rows, "accuracy": accuracy},
    )
    _plot_cost(out / "tradeoff.png", rows)
    if accuracy:
        _plot_accuracy(out / "accuracy.png", accuracy)
    _report(out / "report.md", rows, bool(accuracy))
    return {"configurations": len(rows), "runs": len(accuracy)}
