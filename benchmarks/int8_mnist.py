"""int8 accuracy on the built-in MNIST models: top-1 before and after quantization.

For each model, trains it with the demo recipe (`mobilenet train --data mnist --recipe
demo`, unless ``RUNS/q_MODEL/best.safetensors`` exists already), then quantizes it each
way asked (``--methods``, all by default) and evaluates each on the 1,000 held-out digits:

* ``torch-ptq``  PyTorch FX, x86 backend, 512 calibration images
* ``torch-qat``  PyTorch FX, x86 backend, 3 epochs of quantization-aware fine-tuning
* ``onnx-ptq``   ONNX Runtime static QDQ, 512 calibration images (as ``quantize`` writes it:
  MobileNetV3's stem and first block in float32)
* ``onnx-ptq-int``  the same with ``--integer-only``: every operator in int8
* ``openvino-ptq``  OpenVINO IR by NNCF post-training quantization, 512 calibration images

Goals (deploy issue): drop <= 0.5 point for mobilenet_v2 (PTQ), <= 1 point for the V3
models (PTQ or QAT).

    python benchmarks/int8_mnist.py [--runs runs] [--models mobilenet_v2,...] [--methods ...]

Methods not run are kept from the record, each with the float top-1 and the machine it
was measured with (the record's rows come from runs on more than one CPU).
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
PTQ = ["--method", "ptq", "--calibration-images", "512"]
# method: (the int8 file's suffix, quantize's flags)
METHODS = {
    "torch-ptq": (".safetensors", ["--format", "torch", *PTQ]),
    "torch-qat": (".safetensors", ["--method", "qat", "--format", "torch", "--epochs", "3"]),
    "onnx-ptq": (".onnx", ["--format", "onnx", *PTQ]),
    "onnx-ptq-int": (".onnx", ["--format", "onnx", *PTQ, "--integer-only"]),
    "openvino-ptq": (".xml", ["--format", "openvino", *PTQ]),
}


def mobilenet(*args: str) -> str:
    command = [sys.executable, "-m", "mobilenet", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def top1(weights: Path) -> float:
    out = mobilenet("eval", "--weights", str(weights), "--data", "mnist", "--json")
    return json.loads(out)["top1"]


def versions(method: str) -> dict[str, str]:
    """The versions of the runtime a method's int8 file is made and run by (beyond torch)."""
    if not method.startswith("openvino"):
        return {}
    import nncf
    import openvino

    return {"openvino": openvino.get_version(), "nncf": nncf.__version__}


def kept(before: dict, method: str, recorded_machine: str | None) -> dict:
    """A method's entry from the record, with the float top-1 and the machine it was
    measured with (its own where it has them, else its row's, else the record's)."""
    entry = {"float_top1": before["float_top1"], **before[method]}
    cpu = before[method].get("machine", before.get("machine", recorded_machine))
    return {**entry, "machine": cpu} if cpu else entry


def record_machine(rows: list[dict]) -> str:
    """The machine every figure of ``rows`` was measured on, or where to find each."""
    cpus = {r.get("machine") for r in rows}
    cpus |= {r[m].get("machine", r.get("machine")) for r in rows for m in METHODS if m in r}
    return cpus.pop() if len(cpus) == 1 and None not in cpus else "per row and method (see rows)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("int8_mnist.json"))
    args = parser.parse_args()
    record = json.loads(args.json.read_text()) if args.json.is_file() else {"rows": []}
    recorded, recorded_machine = record["rows"], record.get("machine")
    if recorded_machine and recorded_machine.startswith("per row"):
        recorded_machine = None  # every row and method names its own
    here = machine()
    rows = []
    for model in args.models.split(","):
        run = args.runs / f"q_{model}"
        weights = run / "best.safetensors"
        if not weights.is_file():
            mobilenet("train", "--model", model, "--data", "mnist", "--recipe", "demo",
                      "--workers", "0", "--quiet", "--out", str(run))  # fmt: skip
        command = " ".join(["python", *sys.argv])
        row = {"model": model, "command": command, "machine": here, "float_top1": top1(weights)}
        for method in args.methods.split(","):
            suffix, flags = METHODS[method]
            out = run / f"int8-{method}{suffix}"
            start = time.perf_counter()
            mobilenet("quantize", "--weights", str(weights), "--data", "mnist", "--out", str(out),
                      *flags)  # fmt: skip
            seconds = time.perf_counter() - start
            row[method] = {"top1": top1(out), "seconds": round(seconds, 1)}
            row[method]["drop"] = round(row["float_top1"] - row[method]["top1"], 2)
            row[method]["command"] = command
            row[method].update(versions(method))
        # Methods not run this time are kept from the record, with their own float top-1.
        before = next((r for r in recorded if r["model"] == model), None)
        for method in METHODS:
            if method not in row and before and method in before:
                row[method] = kept(before, method, recorded_machine)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # Rows of models not run this time are kept from the recorded file.
    if recorded:
        done = {row["model"] for row in rows}
        others = [r for r in recorded if r["model"] not in done]
        if recorded_machine:
            others = [{**r, "machine": r.get("machine", recorded_machine)} for r in others]
        rows = sorted(others + rows, key=lambda r: MODELS.index(r["model"]))
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
        "machine": record_machine(rows),
        "torch": torch.__version__,
        "data": "built-in mnist, 1,000 held-out digits at 48x48",
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
