"""ExecuTorch (.pte, XNNPACK) against eager PyTorch at batch 1, in one process.

The model is exported with ``mobilenet export --format pte``'s own function, then both run
in interleaved rounds on the same input (eager: BatchNorm folded, channels_last, the
allocator setting of training). Needs the ``mobile`` extra.

    python benchmarks/pte_latency.py [--model mobilenet_v2] [--threads 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mobilenet import create_model
from mobilenet.export import prepare_for_inference
from mobilenet.export.executorch import export_pte, read_pte, set_pte_threads
from mobilenet.machine import cpu
from mobilenet.train.cpu import keep_freed_memory


def _median_ms(fn, x: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("pte_latency.json"))
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    set_pte_threads(args.threads)
    model = create_model(args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pte"
        export_pte(model, path, args.resolution)
        pte, _ = read_pte(path)
    eager = prepare_for_inference(model)
    x = torch.rand(1, 3, args.resolution, args.resolution)
    runs: dict[str, list[float]] = {"executorch": [], "eager-fused": []}
    with torch.inference_mode():
        eager(x.contiguous(memory_format=torch.channels_last))  # warm-up
        pte(x)
        for _ in range(args.rounds):
            runs["executorch"].append(_median_ms(pte, x, args.calls))
            runs["eager-fused"].append(
                _median_ms(eager, x.contiguous(memory_format=torch.channels_last), args.calls)
            )
    result = {
        "command": "python benchmarks/pte_latency.py",
        "cpu": cpu(),
        "model": args.model,
        "resolution": args.resolution,
        "threads": args.threads,
        "median_ms": {k: round(statistics.median(v), 3) for k, v in runs.items()},
        "round_medians_ms": runs,
    }
    print(json.dumps({k: result[k] for k in ("cpu", "model", "threads", "median_ms")}))
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
