"""The demo's target: >= 97% top-1 on the 1,000 held-out MNIST digits in <= 5 minutes.

Runs exactly what `make demo` runs (the `demo` recipe on the built-in MNIST subset) and
records the validation top-1 after each epoch, the training time and the machine.

    python benchmarks/demo_mnist.py [--threads 2] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mobilenet.classification.task import TrainConfig, train
from mobilenet.machine import machine
from mobilenet.train import get_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("demo_mnist.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            args.model, "mnist", Path(tmp) / "run", get_recipe("demo"), workers=args.workers
        )
        start = time.perf_counter()
        result = train(cfg)
        seconds = time.perf_counter() - start
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    record = {
        "command": f"mobilenet train --data mnist --model {args.model} --recipe demo "
        f"--workers {args.workers} --out runs/demo",
        "machine": machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "best_val_top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "train_seconds": seconds,
        "final_epoch": summary["final"],
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
