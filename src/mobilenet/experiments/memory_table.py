"""memory: V2 Table 3, the memory that must be materialised at each spatial resolution.

The paper counts, for each spatial size of a 224x224 input, the largest tensor that crosses
between operations, in 16-bit floats: for MobileNetV1 every layer's output; for
MobileNetV2 only the bottleneck tensors (the block outputs), because its memory-efficient
executor never materialises an expanded tensor whole (the stem's output is the first
block's expansion, t = 1 there), and the last 1x1 conv is fused with the pooling (only its
pooled 1x1 vector exists). Both come here from
the networks themselves (the output shape of every layer at the given input), then the
whole-network peaks at fp32: V1 and V2 run as standard PyTorch (the cost model's peak of
live tensors) and V2 with :func:`mobilenet.memory_efficient` (analytic and measured).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blocks import InvertedResidual
from .common import figure, markdown_table, save_figure, write_csv, write_json, write_text

PAPER_KB = {  # V2 Table 3 (as computed in papers.md): spatial size -> (V1 KB, V2 KB)
    112: (1606, 401),
    56: (803, 201),
    28: (401, 100),
    14: (201, 63),
    7: (100, 31),
    1: (2, 2.5),
}


def materialised(model: nn.Module, resolution: int, bottlenecks_only: bool) -> dict[int, int]:
    """Largest channel count of a tensor crossing between operations, per spatial size."""
    shapes: list[tuple[int, int]] = []  # (spatial size, channels)

    def record(_module, _inputs, output) -> None:
        shapes.append((output.shape[-1], output.shape[1]))

    hooks = []
    for layer in model.features:
        if bottlenecks_only:
            if isinstance(layer, InvertedResidual):
                hooks.append(layer.register_forward_hook(record))
        else:  # every conv's output (V1: the depthwise and the pointwise ones)
            for conv in layer.modules():
                if isinstance(conv, nn.Conv2d):
                    hooks.append(conv.register_forward_hook(record))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, resolution, resolution))
    finally:
        for hook in hooks:
            hook.remove()
    widest: dict[int, int] = {}
    for size, channels in shapes:
        widest[size] = max(widest.get(size, 0), channels)
    widest[1] = model.feature_info[-1].channels  # the pooled vector
    return widest


# Whole-network peaks, in the order of the plot's bars and the report's columns.
_PEAK_KINDS = (
    "v1_standard_bytes",
    "v2_standard_bytes",
    "v2_efficient_analytic_bytes",
    "v2_efficient_measured_bytes",
)


def _table3(v1: nn.Module, v2: nn.Module) -> list[dict[str, Any]]:
    """Table 3's rows: the widest materialised tensor of each network per spatial size."""
    c1, c2 = materialised(v1, 224, False), materialised(v2, 224, True)
    rows = []
    for size in sorted(c1, reverse=True):
        kb1, kb2 = c1[size] * size * size * 2 / 1000, c2[size] * size * size * 2 / 1000
        rows.append(
            {
                "size": size,
                "v1_channels": c1[size],
                "v1_kb": round(kb1, 1),
                "v2_channels": c2[size],
                "v2_kb": round(kb2, 1),
                "paper_v1_kb": PAPER_KB.get(size, (None, None))[0],
                "paper_v2_kb": PAPER_KB.get(size, (None, None))[1],
            }
        )
    return rows


def _peaks(v1: nn.Module, v2: nn.Module, quick: bool, splits: int) -> list[dict[str, Any]]:
    """Whole-network fp32 peaks: standard PyTorch, and V2 with the memory-efficient executor."""
    from ..cost import cost
    from ..memory import measure_peak, memory_efficient

    peaks = []
    for resolution in (224,) if quick else (224, 512):
        efficient = memory_efficient(v2, splits=splits)
        x = torch.randn(1, 3, resolution, resolution)
        peaks.append(
            {
                "resolution": resolution,
                "v1_standard_bytes": cost(v1, resolution).peak_activation_bytes,
                "v2_standard_bytes": cost(v2, resolution).peak_activation_bytes,
                "v2_efficient_analytic_bytes": efficient.analytic_peak(resolution),
                "v2_efficient_measured_bytes": measure_peak(efficient, x, module=efficient),
            }
        )
    return peaks


def _plot(path: Path, rows: list[dict[str, Any]], peaks: list[dict[str, Any]], splits: int) -> None:
    """Table 3 as bars per spatial size, and the whole-network peaks per input size."""
    fig, axes = figure(ncols=2, size=(6.0, 4.5))
    ax = axes[0][0]
    labels = [f"{r['size']}x{r['size']}" for r in rows]
    positions = torch.arange(len(rows)).tolist()
    ax.bar([p - 0.2 for p in positions], [r["v1_kb"] for r in rows], 0.4, label="MobileNetV1")
    ax.bar([p + 0.2 for p in positions], [r["v2_kb"] for r in rows], 0.4, label="MobileNetV2")
    ax.set_xticks(positions, labels)
    ax.set_xlabel("spatial size (224x224 input)")
    ax.set_ylabel("largest materialised tensor (KB, 16-bit)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("V2 Table 3: memory to materialise per resolution")
    ax = axes[0][1]
    names = ["V1", "V2", f"V2 efficient t={splits}\n(analytic)", "V2 efficient\n(measured)"]
    width = 0.8 / len(peaks)
    for i, peak in enumerate(peaks):
        ax.bar(
            [k + i * width for k in range(len(_PEAK_KINDS))],
            [peak[k] / 2**20 for k in _PEAK_KINDS],
            width,
            label=f"{peak['resolution']}x{peak['resolution']}",
        )
    ticks = [k + width * (len(peaks) - 1) / 2 for k in range(len(_PEAK_KINDS))]
    ax.set_xticks(ticks, names, fontsize=8)
    ax.set_ylabel("peak activation memory (MiB, fp32, batch 1)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("whole-network peak of live activations")
    save_figure(fig, path)


def _v2_note(rows: list[dict[str, Any]]) -> str:
    """The V2 rows that differ from the paper's column by more than 1 KB, and why."""
    differing = [
        f"{r['size']}x{r['size']}"
        for r in rows
        if r["paper_v2_kb"] is not None and abs(r["v2_kb"] - r["paper_v2_kb"]) > 1
    ]
    if not differing:
        return "Every row matches the paper within 1 KB."
    return (
        f"V2 rows that differ from the paper's column: {', '.join(differing)}. The paper lists "
        "there the channels of the next stage, whose first block starts at that size but "
        "writes its output at half of it; counted by where tensors really live, those "
        "sizes hold narrower tensors."
    )


def _report(
    path: Path, rows: list[dict[str, Any]], peaks: list[dict[str, Any]], splits: int
) -> dict[str, Any]:
    """Write report.md; return the maxima and whether they match the paper's."""
    table = markdown_table(
        ["size", "V1 channels", "V1 KB", "paper", "V2 channels", "V2 KB", "paper"],
        [
            [
                f"{r['size']}x{r['size']}",
                r["v1_channels"],
                r["v1_kb"],
                r["paper_v1_kb"],
                r["v2_channels"],
                r["v2_kb"],
                r["paper_v2_kb"],
            ]
            for r in rows
        ],
    )
    peak_table = markdown_table(
        ["input", "V1 (PyTorch)", "V2 (PyTorch)", f"V2 efficient t={splits}", "measured"],
        [[f"{p['resolution']}", *(f"{p[k] / 2**20:.2f} MiB" for k in _PEAK_KINDS)] for p in peaks],
    )
    max1, max2 = max(r["v1_kb"] for r in rows), max(r["v2_kb"] for r in rows)
    paper1, paper2 = (max(v[i] for v in PAPER_KB.values()) for i in (0, 1))
    matches = abs(max1 - paper1) <= 0.01 * paper1 and abs(max2 - paper2) <= 0.01 * paper2
    note = _v2_note(rows)
    write_text(
        path,
        f"""# memory (MobileNetV2 Table 3)

Largest tensor crossing between operations at each spatial size of a 224x224 input,
16-bit activations (channels x H x W x 2 bytes; KB = 1000 bytes):

{table}

Maxima: V1 {max1:.0f}K, V2 {max2:.0f}K (paper: 1600K and 400K): the paper's maxima are
{"reproduced" if matches else "NOT reproduced"} (within 1%), a {max1 / max2:.1f}x reduction.
{note}

Whole-network peak of live activations (fp32, batch 1): V1 and V2 as standard PyTorch (the
cost model), V2 computed by the memory-efficient executor with t = {splits} (analytic and
measured from the real allocations):

{peak_table}

![memory](memory.png)
""",
    )
    return {"v1_max_kb": max1, "v2_max_kb": max2, "maxima_match_paper": matches}


def run(out: Path, quick: bool = False, splits: int = 4) -> dict[str, Any]:
    from ..models import create_model

    v1, v2 = create_model("mobilenet_v1"), create_model("mobilenet_v2")
    rows = _table3(v1, v2)
    write_csv(out / "table3.csv", rows)
    peaks = _peaks(v1, v2, quick, splits)
    write_json(out / "results.json", {"table3": rows, "peaks_fp32": peaks, "splits": splits})
    _plot(out / "memory.png", rows, peaks, splits)
    return _report(out / "report.md", rows, peaks, splits)
