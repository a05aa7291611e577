"""LiteRT int8 as ``mobilenet quantize --format tflite`` writes it (h-swish and h-sigmoid
as add, clamp and multiply, quantized) against h-swish left as litert-torch's quantizer
leaves it (float, between a DEQUANTIZE and a QUANTIZE), and against float32.

For mobilenet_v2, mobilenet_v3_large and mobilenet_v3_small with the same random weights
at 224, batch 1: the three files run by the LiteRT interpreter in one process, interleaved
rounds, with each file's operator counts and how busy other processes kept the cores
(from /proc/stat).

    OMP_NUM_THREADS=1 python benchmarks/litert_int8.py [--threads 1]

writes ``benchmarks/litert_int8.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import torch

from mobilenet import create_model
from mobilenet.export import litert
from mobilenet.machine import cpu, load_snapshot, machine, others_since

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
FILES = ("fp32", "int8 float h-swish", "int8")


def operators(path: Path) -> dict[str, int]:
    from ai_edge_litert.interpreter import Interpreter

    details = Interpreter(model_path=str(path))._get_ops_details()
    return dict(Counter(d["op_name"] for d in details).most_common())


def write_files(model: str, folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    net = create_model(model).eval()
    calibration = [torch.randn(1, 3, 224, 224) for _ in range(8)]
    paths = {name: folder / f"{name.replace(' ', '_')}.tflite" for name in FILES}
    litert.export_tflite(net, paths["fp32"])
    litert.export_tflite_int8(net, iter(calibration), paths["int8"])
    with mock.patch.object(litert, "integer_activations", lambda module: module):
        litert.export_tflite_int8(net, iter(calibration), paths["int8 float h-swish"])
    return paths


def timed(paths: dict[str, Path], threads: int, rounds: int, calls: int) -> dict[str, list]:
    runs = {name: litert.read_tflite(path, threads=threads)[0] for name, path in paths.items()}
    x = torch.randn(1, 3, 224, 224)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        for _ in range(10):
            run(x)
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run(x)
            times[name].append(1000 * (time.perf_counter() - start) / calls)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    default_json = Path(__file__).with_name("litert_int8.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record: dict = {"command": " ".join(["python", *sys.argv]), "machine": machine(),
                    "cpu": cpu(), "threads": args.threads, "batch": 1, "rows": []}  # fmt: skip
    for model in MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            paths = write_files(model, Path(tmp))
            ops = {name: operators(path) for name, path in paths.items()}
            start = load_snapshot()
            times = timed(paths, args.threads, args.rounds, args.calls)
            busy = others_since(start)
        medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
        row = {"model": model, "median_ms": medians, "busy_other_cores": busy,
               "int8_over_fp32": round(medians["int8"] / medians["fp32"], 3),
               "int8_over_float_hswish": round(medians["int8"] / medians["int8 float h-swish"], 3),
               "operators": ops, "round_medians_ms": times}  # fmt: skip
        record["rows"].append(row)
        print(f"{model:20s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in medians.items())
              + f"  (others busy {busy:.2f} cores)", flush=True)  # fmt: skip
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
