"""Record memory-efficient inference (V2 Section 5.1) on MobileNetV4: peak activation
memory and time of the executor against the standard forward, batch 1, random weights.

The headline row is ``mobilenet memory mobilenet_v4_conv_medium --resolution 512`` at
t = 1, 2, 4, 8, with and without the tiling of the leading layers (the stem and the fused
IB); Conv-S at 224 and Hybrid-M at 256 (their own resolutions) at t = 4 for context.
Every row checks that the executor's outputs equal the standard forward's. Writes
benchmarks/memory_v4.json and prints a table.

    python benchmarks/memory_v4.py [--repeats 3] [--threads 1]

Times are medians of interleaved calls on a shared machine: compare ratios, not ms.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from mobilenet.fileio import atomic_write
from mobilenet.machine import machine
from mobilenet.memory import memory_report

HERE = Path(__file__).parent
MIB = 2**20
ROWS = [
    *(("mobilenet_v4_conv_medium", 512, t, 16) for t in (1, 2, 4, 8)),
    ("mobilenet_v4_conv_medium", 512, 4, None),
    ("mobilenet_v4_conv_small", 224, 4, 16),
    ("mobilenet_v4_hybrid_medium", 256, 4, 16),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "memory_v4.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    rows = []
    for name, resolution, splits, band_rows in ROWS:
        r = memory_report(
            name, splits=splits, resolution=resolution, band_rows=band_rows, repeats=args.repeats
        )
        if r.max_abs_diff > 1e-5 * max(r.max_abs_output, 1e-6):
            raise SystemExit(f"{name}: outputs differ by {r.max_abs_diff:.2e}")
        rows.append(
            {
                "model": name,
                "resolution": resolution,
                "splits": splits,
                "band_rows": band_rows,
                "analytic": r.analytic,
                "measured": r.measured,
                "time_ms": r.time_ms,
                "memory_ratio": r.measured["efficient_bytes"] / r.measured["standard_bytes"],
                "time_ratio": r.time_ms["efficient"] / r.time_ms["standard"],
                "max_abs_diff": r.max_abs_diff,
                "max_abs_output": r.max_abs_output,
            }
        )
        print(
            f"{name:27} {resolution:4}  t={splits}  bands {band_rows or '-':>2}  "
            f"standard {r.measured['standard_bytes'] / MIB:6.2f} MiB  "
            f"efficient {r.measured['efficient_bytes'] / MIB:6.2f} MiB "
            f"(analytic {r.analytic['efficient_bytes'] / MIB:6.2f}, paper bound "
            f"{r.analytic['paper_bound_bytes'] / MIB:6.2f})  time x{rows[-1]['time_ratio']:.2f}"
        )
    record = {
        "command": "mobilenet memory mobilenet_v4_conv_medium --resolution 512",
        "machine": machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_at_start": round(load_at_start, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "rows": rows,
    }
    atomic_write(args.out, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))


if __name__ == "__main__":
    main()
