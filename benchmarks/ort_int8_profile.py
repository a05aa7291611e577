"""Where ONNX Runtime's time goes, float32 against int8, operator type by operator type.

The deploy issue asks for V3-Large int8 at <= 0.6x its float32 time (batch 1, 1 thread).
This script says how far the int8 graph's parts are from that: it exports the model
(random weights, BatchNorm statistics measured on random images as ``mobilenet bench``
times it: ``bench.timing_model``), quantizes it as ``mobilenet quantize --format
onnx`` does (integer h-swish, its shift folded into a Clip of integers, padded depthwise
channels, V3's stem and first block in float32, or every operator in int8 with
``--integer-only``; calibrated on 8 random images), and runs both files with ONNX
Runtime's profiler, then sums the kernel time per operator type.
The profiler adds its own cost to every node, which overstates the small element-wise
ones, so the script also times, side by side without the profiler, two copies of the int8
file that compute wrong values in the same shapes: h-swish's integer Mul replaced by an
integer Add (``hswish_mul_as_add``), and h-swish's Clip removed (``no_hswish_clip``).
What they save is what those operators cost.
The convolutions' own ratio (int8 QLinearConv against float32 Conv, whose NCHWc kernels
carry the fused activations) and the int8 time of everything else say where the gap is:
int8 reaches 0.6x of float32 only when the other int8 operators fit in what is left of
0.6x the float32 time after the int8 convolutions (``other_int8_budget_us``).

    OMP_NUM_THREADS=1 python benchmarks/ort_int8_profile.py [--model mobilenet_v3_large]
        [--integer-only]

writes ``benchmarks/ort_int8_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from ort_float_head import timed  # one interleaved timing loop for both scripts

from mobilenet.bench import timing_model
from mobilenet.export import export_onnx
from mobilenet.export.quantize import float_modules, quantize_file
from mobilenet.machine import cpu, load_snapshot, machine, others_since

CONVS = {"Conv", "QLinearConv", "FusedConv"}


def profile(path: Path, x: np.ndarray, calls: int) -> dict[str, float]:
    """Microseconds per call of each operator type, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(calls):
        session.run(None, {"images": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    total: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            total[event["args"]["op_name"]] += event["dur"]
    return {op: round(us / calls, 1) for op, us in total.most_common()}


def ablations(int8: Path) -> dict[str, Path]:
    """Copies of the int8 file without part of h-swish's cost (their values are wrong):
    each Mul that reads h-swish's Clip as an Add, or each such Clip removed."""
    import onnx

    paths = {}
    for variant in ("hswish_mul_as_add", "no_hswish_clip"):
        model = onnx.load(str(int8))
        nodes = model.graph.node
        integers = {n.output[0] for n in nodes if n.op_type == "QuantizeLinear"}
        clipped = {  # h-swish's Clips of integers, not a float Clip left between DQ and Q
            n.output[0]: n.input[0] for n in nodes if n.op_type == "Clip" and n.input[0] in integers
        }
        if variant == "hswish_mul_as_add":
            producer = {out: node for node in nodes for out in node.output}
            for node in nodes:  # a Mul reading a DequantizeLinear of a Clip
                read = [producer.get(i) for i in node.input]
                if node.op_type == "Mul" and any(r and r.input[0] in clipped for r in read):
                    node.op_type = "Add"
        else:
            kept = [n for n in nodes if n.output[0] not in clipped]
            for node in kept:  # read the integers before the Clip
                node.input[:] = [clipped.get(i, i) for i in node.input]
            del nodes[:]
            nodes.extend(kept)
        paths[variant] = int8.with_name(f"{variant}.onnx")
        onnx.save(model, str(paths[variant]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v3_large")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--integer-only", action="store_true", help="no module in float32")
    default_json = Path(__file__).with_name("ort_int8_profile.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    start = load_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "fp32.onnx", "int8": Path(tmp) / "int8.onnx"}
        export_onnx(timing_model(args.model), paths["fp32"], 224)
        calibration = ({"images": rng.standard_normal(x.shape, dtype=np.float32)} for _ in range(8))
        keep = () if args.integer_only else float_modules(args.model)
        quantize_file(paths["fp32"], paths["int8"], calibration, keep)
        ablated = ablations(paths["int8"])
        median_ms = timed({**paths, **ablated}, x, 1, args.rounds)
        ops = {name: profile(path, x, args.calls) for name, path in paths.items()}
    conv = {name: sum(us for op, us in o.items() if op in CONVS) for name, o in ops.items()}
    total = {name: sum(o.values()) for name, o in ops.items()}
    record = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "cpu": cpu(),
        "model": args.model,
        "batch": 1,
        "threads": 1,
        "float_modules": list(keep),
        "median_ms": median_ms,
        "int8_over_fp32": round(median_ms["int8"] / median_ms["fp32"], 3),
        "ablation_over_int8": {k: round(median_ms[k] / median_ms["int8"], 3) for k in ablated},
        "kernel_us": ops,
        "conv_us": conv,
        "conv_int8_over_fp32": round(conv["int8"] / conv["fp32"], 3),
        "other_int8_us": round(total["int8"] - conv["int8"], 1),
        "other_int8_budget_us": round(0.6 * total["fp32"] - conv["int8"], 1),
        "busy_other_cores": others_since(start),
    }
    print(f"{args.model}: fp32 {median_ms['fp32']:.2f} ms, int8 {median_ms['int8']:.2f} ms "
          f"({record['int8_over_fp32']:.3f}x); convolutions alone {conv['int8']:.0f} / "
          f"{conv['fp32']:.0f} us ({record['conv_int8_over_fp32']:.3f}x); others busy "
          f"{record['busy_other_cores']} cores; ablations / int8 "
          f"{record['ablation_over_int8']}")  # fmt: skip
    for name, o in ops.items():
        print(f"  {name}: " + ", ".join(f"{op} {us:.0f}" for op, us in list(o.items())[:8]))
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
