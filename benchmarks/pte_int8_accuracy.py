"""int8 ExecuTorch programs on the built-in MNIST models: held-out top-1, float32 vs int8.

For each model, trains it with the demo recipe (`mobilenet train --data mnist --recipe
demo`, unless ``RUNS/MODEL/best.safetensors`` exists already), then writes two ExecuTorch
programs and evaluates each on the 1,000 held-out digits:

* ``fp32``  `mobilenet export --format pte` (XNNPACK, float32)
* ``int8``  `mobilenet quantize --format pte` (PT2E, XNNPACK quantizer), calibrated on 512
  images of the training split

Goals (deploy issue): an int8 drop <= 0.5 point for mobilenet_v2, <= 1 point for the V3
models. Each row also says which operators the quantizer left in float (they run between
a dequantize and a quantize) and which run outside XNNPACK (the program's own kernels).

    OMP_NUM_THREADS=1 python benchmarks/pte_int8_accuracy.py [--runs runs/pte_int8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from mobilenet.machine import cpu, machine

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
TARGET_DROP = {"mobilenet_v2": 0.5, "mobilenet_v3_large": 1.0, "mobilenet_v3_small": 1.0}


def mobilenet(*args: str) -> tuple[str, str, float]:
    """Run ``mobilenet ARGS``: its command line, its standard output, its seconds."""
    command = [sys.executable, "-m", "mobilenet", *args]
    start = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return " ".join(["mobilenet", *args]), out, round(time.perf_counter() - start, 1)


def top1(weights: Path) -> float:
    _, out, _ = mobilenet("eval", "--weights", str(weights), "--data", "mnist", "--json")
    return json.loads(out)["top1"]


def float_operators(weights: Path) -> dict[str, int]:
    """The operators of the network that the XNNPACK quantizer leaves in float: those
    without a quantization annotation after ``prepare_pt2e`` (the annotation does not
    depend on the calibration images)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from mobilenet.classification.predict import load_trained
    from mobilenet.export.executorch import xnnpack_quantizer
    from mobilenet.export.prepare import prepare_for_inference

    trained = load_trained(str(weights))
    model = prepare_for_inference(trained.model.eval(), channels_last=False)
    example = torch.randn(2, 3, trained.resolution, trained.resolution)
    observed = prepare_pt2e(torch.export.export(model, (example,)).module(), xnnpack_quantizer())
    left = Counter()
    for node in observed.graph.nodes:
        annotation = node.meta.get("quantization_annotation")
        if node.op == "call_function" and not getattr(annotation, "_annotated", False):
            left[str(node.target).removeprefix("aten.")] += 1
    return dict(left)


def program_calls(pte: Path) -> dict[str, int]:
    """What the program's ``forward`` runs: XNNPACK delegate calls, and each operator that
    runs on ExecuTorch's own kernels, outside XNNPACK."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = next(
        p for p in deserialize_pte_binary(pte.read_bytes()).program.execution_plan
        if p.name == "forward"
    )  # fmt: skip
    calls = Counter()
    for chain in plan.chains:
        for instruction in chain.instructions:
            op = getattr(instruction.instr_args, "op_index", None)
            calls["xnnpack delegate" if op is None else plan.operators[op].name] += 1
    return dict(calls)


def measure(model: str, runs: Path) -> dict:
    run = runs / model
    weights = run / "best.safetensors"
    train = ["train", "--model", model, "--data", "mnist", "--recipe", "demo", "--workers", "0"]
    train += ["--quiet", "--out", str(run)]
    commands = {"train": " ".join(["mobilenet", *train])}
    if not weights.is_file():
        commands["train"], _, commands["train_seconds"] = mobilenet(*train)
    fp32, int8 = run / "fp32.pte", run / "int8.pte"
    export = ["export", "--model", model, "--weights", str(weights), "--format", "pte"]
    commands["export"], _, export_s = mobilenet(*export, "--out", str(fp32))
    quantize = ["quantize", "--weights", str(weights), "--data", "mnist", "--format", "pte"]
    quantize += ["--calibration-images", "512", "--out", str(int8)]
    commands["quantize"], said, quantize_s = mobilenet(*quantize)
    commands["eval"] = "mobilenet eval --weights FILE --data mnist --json"
    row = {
        "model": model,
        "commands": commands,
        "pytorch_top1": top1(weights),
        "fp32_pte_top1": top1(fp32),
        "int8_pte_top1": top1(int8),
        "export_seconds": export_s,
        "quantize_seconds": quantize_s,
        "quantize_said": said.strip(),
    }
    row["int8_drop"] = round(row["fp32_pte_top1"] - row["int8_pte_top1"], 2)
    row["target_drop"] = TARGET_DROP[model]
    row["met"] = row["int8_drop"] <= TARGET_DROP[model]
    row["float_in_int8"] = float_operators(weights)
    row["int8_program_calls"] = program_calls(int8)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/pte_int8"))
    parser.add_argument("--models", default=",".join(MODELS))
    default_json = Path(__file__).with_name("pte_int8_accuracy.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        rows.append(measure(model, args.runs))
        print(json.dumps(rows[-1]), flush=True)
    print(f"{'model':<20} {'PyTorch':>8} {'fp32 .pte':>10} {'int8 .pte':>10} {'drop':>6} target")
    for r in rows:
        print(
            f"{r['model']:<20} {r['pytorch_top1']:>8.2f} {r['fp32_pte_top1']:>10.2f} "
            f"{r['int8_pte_top1']:>10.2f} {r['int8_drop']:>6.2f} <= {r['target_drop']:g} "
            f"{'met' if r['met'] else 'MISSED'}"
        )
    import executorch.version

    record = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "executorch": executorch.version.__version__,
        "threads": torch.get_num_threads(),
        "data": "built-in mnist: demo recipe at 48x48, 1,000 held-out digits",
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
