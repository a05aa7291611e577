"""MobileNetV4-Conv-S on the built-in MNIST: >= 97% top-1 with the V4 recipe scaled down.

Runs the two commands a user would (``mobilenet train`` with the ``mobilenet_v4-demo``
recipe, then ``mobilenet eval`` of the best checkpoint on the 1,000 held-out digits) and
records the commands, their seconds, the top-1 of each, the CPU, the threads and the
load other processes put on the cores while it ran.

    OMP_NUM_THREADS=2 python benchmarks/v4_mnist.py [--out runs/v4-mnist]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mobilenet.machine import load_snapshot, machine, others_since

MOBILENET = str(Path(sys.executable).with_name("mobilenet"))


def run(command: list[str]) -> tuple[str, float]:
    """The command's standard output and its wall-clock seconds (it must succeed)."""
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v4_conv_small")
    parser.add_argument("--recipe", default="mobilenet_v4-demo")
    parser.add_argument("--out", type=Path, default=Path("runs/v4-mnist"))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("v4_mnist.json"))
    args = parser.parse_args()
    train = [MOBILENET, "train", "--data", "mnist", "--model", args.model, "--recipe",
             args.recipe, "--workers", "0", "--quiet", "--out", str(args.out)]  # fmt: skip
    weights = args.out / "best.safetensors"
    evaluate = [MOBILENET, "eval", "--weights", str(weights), "--data", "mnist", "--json"]
    load_at_start = os.getloadavg()[0]
    start = load_snapshot()
    _, train_s = run(train)
    out, eval_s = run(evaluate)
    others = others_since(start)
    result = json.loads(out)
    summary = json.loads((args.out / "summary.json").read_text())
    record = {
        "commands": [
            shlex.join(["mobilenet", *train[1:]]),
            shlex.join(["mobilenet", *evaluate[1:]]),
        ],
        "machine": machine(),
        "threads": os.environ.get("OMP_NUM_THREADS", "unset (all cores)"),
        "load_average_at_start": round(load_at_start, 2),
        "other_busy_cores_during_run": None if others is None else round(others, 2),
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "best_val_top1_during_training": summary.get("best_val_top1"),
        "eval_top1": result["top1"],
        "eval": result,
        "final_epoch": summary.get("final"),
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    if result["top1"] < 97.0:
        sys.exit(f"top-1 {result['top1']:.2f}% is below the 97% target")


if __name__ == "__main__":
    main()
