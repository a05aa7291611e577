"""The detection target: mAP@0.5 >= 0.70 (goal 0.85) on mnist-det's 500 held-out images,
training from scratch in <= 20 minutes on 2 CPU cores.

Runs exactly ``mobilenet detect train`` with the settings below, then scores the best
weights with pycocotools, and records the per-epoch history, the time and the machine.
Choices for a 20-minute CPU budget: the smallest detector (SSDLite on MobileNetV3-Small,
1.87M params at 91 classes) at a 160x160 input (the 320x320 images halved), AdamW
(faster from scratch than SGD over a few epochs), photometric augmentation only (the
generated set already varies scale and position; no flips: mirrored digits change
class), the training images decoded and resized once (``--cache``) and no loader
worker, so both cores compute. The generated set is made before the clock starts.

    python benchmarks/detection_mnist.py [--threads 2] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from mobilenet.detection.builtin import dataset_root
from mobilenet.detection.data import CocoDetection, eval_transform
from mobilenet.detection.evaluate import evaluate_detector
from mobilenet.detection.predict import load_detector
from mobilenet.detection.task import DetectTrainConfig, train_detector
from mobilenet.machine import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ssdlite_mobilenet_v3_small")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--min-scale", type=float, default=0.2)
    parser.add_argument("--max-scale", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/detect-mnist"))
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("detection_mnist.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset_root("mnist-det")  # generated once into the cache, outside the timed run
    cfg = DetectTrainConfig(
        model=args.model,
        data="mnist-det",
        out=args.out,
        image_size=args.image_size,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="adamw",
        lr=args.lr,
        warmup_epochs=0.3,
        augment="light",
        cache=args.cache,
        eval_every=args.eval_every,
        workers=args.workers,
        progress=False,
    )
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = train_detector(cfg)
    seconds = time.perf_counter() - start
    trained = load_detector(args.out / "best.safetensors")
    held_out = CocoDetection(dataset_root("mnist-det", "val"), eval_transform(), trained.categories)
    metrics = evaluate_detector(trained.model, held_out)
    summary = json.loads((args.out / "summary.json").read_text())
    record = {
        "command": (
            f"mobilenet detect train --model {args.model} --data mnist-det --image-size "
            f"{args.image_size} --min-scale {args.min_scale} --max-scale {args.max_scale} "
            f"--epochs {args.epochs} --batch-size {args.batch_size} --optimizer adamw "
            f"--lr {args.lr} --warmup-epochs 0.3 --augment light"
            f"{' --cache' if args.cache else ''} --no-flip --eval-every {args.eval_every} "
            f"--workers {args.workers} --out {args.out}"
        ),
        "machine": machine(),
        "threads": args.threads,
        "load_average_at_start": round(load, 2),
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        "held_out_images": int(metrics["images"]),
        "map": round(metrics["map"], 4),
        "map_50": round(metrics["map_50"], 4),
        "map_75": round(metrics["map_75"], 4),
        "best_epoch": result.best_epoch,
        "history": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in torch.load(args.out / "last.pt", weights_only=True)["history"]
        ],
        "summary": summary,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
