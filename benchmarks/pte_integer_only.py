"""ExecuTorch int8 with h-swish in float (the default) against integer-only int8.

XNNPACK's PT2E quantizer has no h-swish, so MobileNetV3's h-swish and h-sigmoid run in
float between a dequantize and a quantize; ``mobilenet quantize --format pte
--integer-only`` writes them as add, clamp and multiply, which it quantizes, so every
operator is int8. Two questions, for mobilenet_v3_large and mobilenet_v3_small:

* accuracy: held-out top-1 on the built-in MNIST of both int8 programs of the demo-recipe
  model (trained unless ``RUNS/MODEL/best.safetensors`` exists), calibrated on 512 images;
* speed: both int8 programs and the float32 program of the same random weights at 224,
  batch 1, in one process, interleaved rounds, with how busy other processes kept the
  cores (from /proc/stat).

    OMP_NUM_THREADS=1 python benchmarks/pte_integer_only.py [--threads 1] [--runs runs/pte_int8]

writes ``benchmarks/pte_integer_only.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobilenet import create_model
from mobilenet.export.executorch import export_pte, export_pte_int8, read_pte, set_pte_threads
from mobilenet.machine import cpu, load_snapshot, machine, others_since

sys.path.insert(0, str(Path(__file__).parent))
from pte_int8_accuracy import mobilenet, top1

MODELS = ("mobilenet_v3_large", "mobilenet_v3_small")
PROGRAMS = ("fp32", "int8", "int8 integer-only")


def accuracy(model: str, runs: Path) -> dict:
    run = runs / model
    weights = run / "best.safetensors"
    train = ["train", "--model", model, "--data", "mnist", "--recipe", "demo", "--workers", "0"]
    commands = {"train": " ".join(["mobilenet", *train, "--quiet", "--out", str(run)])}
    if not weights.is_file():
        mobilenet(*train, "--quiet", "--out", str(run))
    row: dict = {"model": model, "pytorch_top1": top1(weights)}
    for name, extra in (("int8", []), ("int8_integer_only", ["--integer-only"])):
        out = run / f"{name}.pte"
        quantize = ["quantize", "--weights", str(weights), "--data", "mnist", "--format", "pte"]
        commands[name], _, _ = mobilenet(*quantize, "--calibration-images", "512", *extra,
                                         "--out", str(out))  # fmt: skip
        row[f"{name}_top1"] = top1(out)
        row[f"{name}_drop"] = round(row["pytorch_top1"] - row[f"{name}_top1"], 2)
    row["commands"] = commands
    return row


def _median_ms(run, x: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def speed(model: str, rounds: int, calls: int) -> dict:
    torch.manual_seed(0)
    net = create_model(model).eval()
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(8)]
    programs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in PROGRAMS:
            path = Path(tmp) / f"{name.replace(' ', '_')}.pte"
            if name == "fp32":
                export_pte(net, path)
            else:
                integer_only = name.endswith("integer-only")
                export_pte_int8(net, iter(calibration), path, integer_only=integer_only)
            programs[name], _ = read_pte(path)
    x = torch.randn(1, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in programs}
    for run in programs.values():
        _median_ms(run, x, 10)  # warm-up
    start = load_snapshot()
    for _ in range(rounds):
        for name, run in programs.items():
            times[name].append(_median_ms(run, x, calls))
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {
        "model": model,
        "median_ms": medians,
        "integer_only_over_int8": round(medians["int8 integer-only"] / medians["int8"], 3),
        "busy_other_cores": others_since(start),
        "round_medians_ms": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/pte_int8"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--skip-accuracy", action="store_true")
    default_json = Path(__file__).with_name("pte_integer_only.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    set_pte_threads(args.threads)
    record: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine(),
                    "cpu": cpu(), "torch": torch.__version__, "threads": args.threads,
                    "speed": [], "accuracy": []}  # fmt: skip
    for model in MODELS:
        record["speed"].append(speed(model, args.rounds, args.calls))
        row = record["speed"][-1]
        print(f"{model:20s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in row["median_ms"].items())
              + f"  (others busy {row['busy_other_cores']} cores)", flush=True)  # fmt: skip
    if not args.skip_accuracy:
        for model in MODELS:
            record["accuracy"].append(accuracy(model, args.runs))
            row = record["accuracy"][-1]
            print(f"{model:20s} top-1 PyTorch {row['pytorch_top1']:.2f}  int8 "
                  f"{row['int8_top1']:.2f}  integer-only {row['int8_integer_only_top1']:.2f}",
                  flush=True)  # fmt: skip
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
