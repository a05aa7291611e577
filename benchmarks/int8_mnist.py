"""int8 accuracy on the built-in MNIST models: top-1 before and after quantization.

For each model, trains it with the demo recipe (`mobilenet train --data mnist --recipe
demo`, unless ``RUNS/q_MODEL/best.safetensors`` exists already), then quantizes it three
ways and evaluates each on the 1,000 held-out digits:

* ``torch-ptq``  PyTorch FX, x86 backend, 512 calibration images
* ``torch-qat``  PyTorch FX, x86 backend, 3 epochs of quantization-aware fine-tuning
* ``onnx-ptq``   ONNX Runtime static QDQ, 512 calibration images (as ``quantize`` writes it:
  MobileNetV3's stem and first block in float32)
* ``onnx-ptq-int``  the same with ``--integer-only``: every operator in int8

Goals (deploy issue): drop <= 0.5 point for mobilenet_v2 (PTQ), <= 1 point for the V3
models (PTQ or QAT).

    python benchmarks/int8_mnist.py [--runs runs] [--models mobilenet_v2,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from mobilenet.machine import machine

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
METHODS = {
    "torch-ptq": ["--method", "ptq", "--format", "torch", "--calibration-images", "512"],
    "torch-qat": ["--method", "qat", "--format", "torch", "--epochs", "3"],
    "onnx-ptq": ["--method", "ptq", "--format", "onnx", "--calibration-images", "512"],
    "onnx-ptq-int": ["--format", "onnx", "--calibration-images", "512", "--integer-only"],
}


def mobilenet(*args: str) -> str:
    command = [sys.executable, "-m", "mobilenet", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def top1(weights: Path) -> float:
    out = mobilenet("eval", "--weights", str(weights), "--data", "mnist", "--json")
    return json.loads(out)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("int8_mnist.json"))
    args = parser.parse_args()
    recorded = json.loads(args.json.read_text())["rows"] if args.json.is_file() else []
    rows = []
    for model in args.models.split(","):
        run = args.runs / f"q_{model}"
        weights = run / "best.safetensors"
        if not weights.is_file():
            mobilenet("train", "--model", model, "--data", "mnist", "--recipe", "demo",
                      "--workers", "0", "--quiet", "--out", str(run))  # fmt: skip
        command = " ".join(["python", *sys.argv])
        row = {"model": model, "command": command, "float_top1": top1(weights)}
        for method in args.methods.split(","):
            flags = METHODS[method]
            suffix = ".onnx" if "onnx" in method else ".safetensors"
            out = run / f"int8-{method}{suffix}"
            start = time.perf_counter()
            mobilenet("quantize", "--weights", str(weights), "--data", "mnist", "--out", str(out),
                      *flags)  # fmt: skip
            seconds = time.perf_counter() - start
            row[method] = {"top1": top1(out), "seconds": round(seconds, 1)}
            row[method]["drop"] = round(row["float_top1"] - row[method]["top1"], 2)
            row[method]["command"] = command
        # Methods not run this time are kept from the record, with their own float top-1.
        before = next((r for r in recorded if r["model"] == model), None)
        for method in METHODS:
            if method not in row and before and method in before:
                # a method's own float top-1 (from another run) wins over the row's
                row[method] = {"float_top1": before["float_top1"], **before[method]}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Rows of models not run this time are kept from the recorded file.
    if recorded:
        done = {row["model"] for row in rows}
        kept = [r for r in recorded if r["model"] not in done]
        rows = sorted(kept + rows, key=lambda r: MODELS.index(r["model"]))
    header = f"{'model':<20} {'float':>7}" + "".join(f" {m:>16}" for m in METHODS)
    print(header)
    for row in rows:
        cells = "".join(
            f" {row[m]['top1']:>8.2f} ({-row[m]['drop']:+.1f})" if m in row else f" {'-':>16}"
            for m in METHODS
        )
        print(f"{row['model']:<20} {row['float_top1']:>7.2f}{cells}")
    record = {
        "command": "python benchmarks/int8_mnist.py [--models ...] (each row: its own run)",
        "machine": machine(),
        "torch": torch.__version__,
        "data": "built-in mnist, 1,000 held-out digits at 48x48",
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
