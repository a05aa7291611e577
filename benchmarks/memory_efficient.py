"""Record memory-efficient inference (V2 Section 5.1) against t = 1..8 for V2 and V3-Large at
224 and 1024, batch 1: peak activation memory and time, each as a ratio to the standard
forward, with and without the spatial tiling of the early layers. Writes
benchmarks/memory_efficient.json and benchmarks/memory_efficient.png and prints a table.

    python benchmarks/memory_efficient.py [--repeats 3] [--threads 1]

Notes on the figures:

* Standard forward: BatchNorm folded, NCHW, inference mode (``prepare_for_inference(model,
  channels_last=False)``); the same model channels_last is timed once per row for context
  (``standard_channels_last_ms``): the executor keeps its maps channels_last, so part of
  its advantage at 1024 is that layout.
* Measured memory comes from observing the forward pass's allocations
  (:class:`mobilenet.memory.PeakMemory`); the executor's measured peak equals the schedule
  replayed from the shapes (analytic). The standard forward measures one tensor more than
  :func:`mobilenet.cost`'s analytic peak, because eager ``nn.Sequential`` keeps a block's
  input alive until the block returns (V2: +8.3%, V3-Large: +12.5%).
* Squeeze-excite (V3-Large) is exact in two passes; ``se_first_pass_ms`` is the time of
  the first pass of every squeeze-excite block (expand + depthwise recomputed only to pool),
  the price of exactness; with t = 1 the blocks run in one pass.
* Times are medians of interleaved calls on a shared machine: compare ratios, not ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mobilenet import create_model
from mobilenet.export import prepare_for_inference
from mobilenet.fileio import atomic_write
from mobilenet.machine import machine
from mobilenet.memory import memory_efficient, memory_report

HERE = Path(__file__).parent
MODELS = ("mobilenet_v2", "mobilenet_v3_large")
RESOLUTIONS = (224, 1024)
SPLITS = tuple(range(1, 9))


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def se_first_pass_ms(name: str, splits: int, resolution: int, repeats: int) -> float:
    """Time of squeeze-excite's pooling pass, summed over the blocks that have one."""
    net = memory_efficient(create_model(name).eval(), splits)
    y = torch.randn(3, resolution, resolution)
    h = w = resolution
    total = 0.0
    with torch.inference_mode():
        for segment in net.segments:
            block = segment.layers[0]
            if len(segment.layers) == 1 and getattr(block, "se", None) is not None:
                total += median_ms(lambda b=block, x=y, n=h: b._gate(x, n), repeats)
            y = segment(y, h, w)
            h, w = y.shape[0], y.shape[1]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "memory_efficient.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    header = (
        f"{'model':<20}{'res':>6}{'t':>3}{'tiling':>8}{'std MiB':>10}{'eff MiB':>9}"
        f"{'mem':>7}{'std ms':>9}{'eff ms':>9}{'time':>6}{'SE pass ms':>11}"
    )
    print(header)
    for name in MODELS:
        for resolution in RESOLUTIONS:
            model = create_model(name).eval()
            cl = prepare_for_inference(model)
            x = torch.randn(1, 3, resolution, resolution).contiguous(
                memory_format=torch.channels_last
            )
            with torch.inference_mode():
                cl_ms = median_ms(lambda m=cl, t=x: m(t), args.repeats)
            for band_rows in (16, None):
                for splits in SPLITS:
                    report = memory_report(
                        name, 1.0, splits, resolution, 1, band_rows, args.repeats
                    ).to_dict()
                    report["standard_channels_last_ms"] = cl_ms
                    se = None
                    # with t = 1 the blocks run in one pass: no first pass to time
                    if name == "mobilenet_v3_large" and band_rows is not None and splits > 1:
                        se = se_first_pass_ms(name, splits, resolution, args.repeats)
                    report["se_first_pass_ms"] = se
                    rows.append(report)
                    m, t = report["measured"], report["time_ms"]
                    print(
                        f"{name:<20}{resolution:>6}{splits:>3}"
                        f"{'bands' if band_rows else 'none':>8}"
                        f"{m['standard_bytes'] / 2**20:>10.2f}{m['efficient_bytes'] / 2**20:>9.2f}"
                        f"{m['efficient_bytes'] / m['standard_bytes']:>7.3f}"
                        f"{t['standard']:>9.1f}{t['efficient']:>9.1f}"
                        f"{t['efficient'] / t['standard']:>6.2f}"
                        f"{'' if se is None else f'{se:.1f}':>11}",
                        flush=True,
                    )
    record = {
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": "python benchmarks/memory_efficient.py " + " ".join(sys.argv[1:]),
        "results": rows,
    }
    atomic_write(args.out, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    plot(record, args.out.with_suffix(".png"))


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(RESOLUTIONS), figsize=(11, 7.5), sharex=True)
    colors = {"mobilenet_v2": "tab:blue", "mobilenet_v3_large": "tab:orange"}
    for col, resolution in enumerate(RESOLUTIONS):
        for name in MODELS:
            for band_rows, style in ((16, "-"), (None, "--")):
                rows = [
                    r
                    for r in record["results"]
                    if r["model"] == name
                    and r["resolution"] == resolution
                    and r["band_rows"] == band_rows
                ]
                ts = [r["splits"] for r in rows]
                measured = [r["measured"] for r in rows]
                mem = [m["efficient_bytes"] / m["standard_bytes"] for m in measured]
                tim = [r["time_ms"]["efficient"] / r["time_ms"]["standard"] for r in rows]
                label = f"{name}, {'tiled' if band_rows else 'no tiling'}"
                axes[0, col].plot(ts, mem, style, marker="o", color=colors[name], label=label)
                axes[1, col].plot(ts, tim, style, marker="o", color=colors[name], label=label)
        axes[0, col].set_title(f"{resolution}x{resolution}, batch 1")
        axes[0, col].axhline(0.25, color="grey", lw=0.8, ls=":")
        axes[0, col].set_ylim(bottom=0)
        axes[1, col].axhline(1.5, color="grey", lw=0.8, ls=":")
        axes[1, col].axhline(1.0, color="grey", lw=0.8)
        axes[1, col].set_xlabel("splits t")
    axes[0, 0].set_ylabel("measured peak / standard forward")
    axes[1, 0].set_ylabel("time / standard forward")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"Memory-efficient inference (V2 Section 5.1), fp32, {record['threads']} thread\n"
        f"{record['machine']}",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
