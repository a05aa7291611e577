"""ONNX Runtime int8 with the stem and first block in float32, against every operator in
int8 and against float32: median ms per batch, interleaved, side by side.

``mobilenet quantize --format onnx`` keeps the modules ``export.quantize.float_modules``
names in float32 (the stem and first block of the models this measured faster so);
``--integer-only`` quantizes them too. This script measures both files against the float32
one, for the models given: the choice of ``float_modules`` comes from its record. Weights
are random with randomised BatchNorm statistics; the files are calibrated on 8 random
batches, which does not change the time.

    OMP_NUM_THREADS=1 python benchmarks/ort_float_head.py [--models ...] [--threads 1]

writes ``benchmarks/ort_float_head.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mobilenet.bench import timing_model
from mobilenet.export import export_onnx
from mobilenet.export.quantize import float_modules, quantize_file
from mobilenet.formats.onnx import ort_session
from mobilenet.machine import cpu, load_snapshot, machine, others_since

MODELS = (
    "mobilenet_v3_large", "mobilenet_v3_small", "mobilenet_v3_large_minimal",
    "mobilenet_v3_small_minimal", "mobilenet_v2", "mobilenet_v1", "mobilenet_v4_conv_small",
    "mobilenet_v4_conv_medium",
)  # fmt: skip
HEAD = ("features.0", "features.1")


def files(name: str, folder: Path, x: np.ndarray) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    paths = {"fp32": folder / f"{name}.onnx"}
    export_onnx(timing_model(name, resolution=x.shape[-1]), paths["fp32"], x.shape[-1])
    for variant, keep in (("int8 all", ()), ("int8 float head", HEAD)):
        paths[variant] = folder / f"{name}-{variant.replace(' ', '-')}.onnx"
        calibration = ({"images": rng.standard_normal(x.shape, dtype=np.float32)} for _ in range(8))
        quantize_file(paths["fp32"], paths[variant], calibration, keep)
    return paths


def timed(paths: dict[str, Path], x: np.ndarray, threads: int, rounds: int) -> dict:
    sessions = {k: ort_session(p, threads, spin=True) for k, p in paths.items()}
    for session in sessions.values():
        session.run(None, {"images": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, session in sessions.items():
            start = time.perf_counter()
            for _ in range(20):
                session.run(None, {"images": x})
            times[k].append(1000 * (time.perf_counter() - start) / 20)
    return {k: round(statistics.median(t), 3) for k, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=40)
    default_json = Path(__file__).with_name("ort_float_head.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = np.random.default_rng(1).standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    command = " ".join(["python", *sys.argv])
    rows = []
    print(f"{'model':<28} {'fp32 ms':>8} {'int8 all':>14} {'float head':>14}  default")
    for name in args.models.split(","):
        start = load_snapshot()
        with tempfile.TemporaryDirectory() as tmp:
            ms = timed(files(name, Path(tmp), x), x, args.threads, args.rounds)
        ratio = {k: round(v / ms["fp32"], 3) for k, v in ms.items()}
        default = "float head" if float_modules(name) else "int8 all"
        row = {"model": name, "median_ms": ms, "over_fp32": ratio, "default": default,
               "busy_other_cores": others_since(start), "command": command}  # fmt: skip
        rows.append(row)
        print(f"{name:<28} {ms['fp32']:>8.2f} {ms['int8 all']:>7.2f} ({ratio['int8 all']:.3f})"
              f" {ms['int8 float head']:>7.2f} ({ratio['int8 float head']:.3f})  {default}"
              f"   others busy {row['busy_other_cores']} cores", flush=True)  # fmt: skip
    # Rows of models not measured this time are kept from the record (each row says its
    # own command).
    if args.json.is_file():
        done = {row["model"] for row in rows}
        kept = [r for r in json.loads(args.json.read_text())["rows"] if r["model"] not in done]
        order = {name: i for i, name in enumerate(MODELS)}
        rows = sorted(kept + rows, key=lambda r: order.get(r["model"], len(order)))
    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/ort_float_head.py [--models ...]",
        "machine": machine(),
        "cpu": cpu(),
        "batch": args.batch,
        "threads": args.threads,
        "resolution": 224,
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
