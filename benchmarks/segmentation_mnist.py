"""The segmentation target: held-out mIoU >= 0.65 (goal 0.75) of LR-ASPP on
MobileNetV3-Small trained from scratch on mnist-seg, within 15 minutes on 2 CPU cores.

Runs exactly the command recorded (``mobilenet train`` with the segmentation task's
defaults: 128x128 crops, AdamW, cosine decay; see :mod:`mobilenet.segmentation.task`),
then ``mobilenet eval --json`` on the 500 held-out images, and records the command, the
CPU, the wall time of training, mIoU, per-class IoU, pixel accuracy, the per-epoch
history, and how busy the machine was (``uptime`` before and after, and the cores other
processes kept busy during the run). The generated set is made before the clock starts.

    python benchmarks/segmentation_mnist.py [--threads 2] [--epochs N] [--out DIR]
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

import torch

from mobilenet.machine import load_snapshot, machine, others_since
from mobilenet.segmentation.builtin import dataset_root


def mobilenet(args: list[str], threads: int) -> str:
    """``mobilenet ARGS`` in a child process with ``threads`` OpenMP threads; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(
        [sys.executable, "-m", "mobilenet", *args], env=env, capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"mobilenet {args[0]} failed:\n{done.stderr}")
    return done.stdout


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lraspp_mobilenet_v3_small")
    parser.add_argument("--epochs", type=int, help="default: the task's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/segment-mnist"))
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("segmentation_mnist.json")
    )
    args = parser.parse_args()
    dataset_root("mnist-seg")  # generated once into the cache, outside the timed run
    train = ["train", "--model", args.model, "--data", "mnist-seg", "--workers",
             str(args.workers), "--out", str(args.out), "--quiet"]  # fmt: skip
    if args.epochs is not None:
        train += ["--epochs", str(args.epochs)]
    before, snapshot = uptime(), load_snapshot()
    start = time.perf_counter()
    mobilenet(train, args.threads)
    seconds = time.perf_counter() - start
    others = others_since(snapshot)
    after = uptime()
    weights = args.out / "best.safetensors"
    scores = json.loads(
        mobilenet(["eval", "--weights", str(weights), "--data", "mnist-seg", "--json"], 1)
    )
    history = torch.load(args.out / "last.pt", weights_only=True)["history"]
    record = {
        "command": f"OMP_NUM_THREADS={args.threads} mobilenet {shlex.join(train)}",
        "eval_command": f"mobilenet eval --weights {weights} --data mnist-seg --json",
        "machine": machine(),
        "threads": args.threads,
        "uptime_before": before,
        "uptime_after": after,
        "other_processes_busy_cores": None if others is None else round(others, 2),
        "torch": torch.__version__,
        "train_wall_seconds": round(seconds, 1),
        "held_out_images": scores["images"],
        "miou": round(scores["miou"], 4),
        "pixel_accuracy": round(scores["pixel_accuracy"], 4),
        "iou": scores["iou"],
        "history": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in history
        ],
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
