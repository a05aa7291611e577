"""Every inference engine side by side, over the grid the deployment work is judged on.

For mobilenet_v2, mobilenet_v3_large and mobilenet_v3_small at 224, batch 1 and 32, 1 and
2 threads: one ``mobilenet bench`` run per point (every engine in its own process,
interleaved rounds, the CPU and its load in the header), recorded with ``--save`` into a
private ``$MOBILENET_HOME``; then what ``predict --engine auto`` would pick from those
records for float weights, and how far that is from the fastest float engine of the
point; and the fastest int8 engine against ExecuTorch int8.

    python benchmarks/engine_grid.py [--models ...] [--batches 1,32] [--threads 1,2]

writes ``benchmarks/engine_grid.json`` and prints a table. Run it on an otherwise idle
machine: the header of each point says how busy other processes kept the cores, and a
point disturbed by more than a quarter of a core is measured again (up to twice).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mobilenet.bench import BUSY_WARNING
from mobilenet.extras import available
from mobilenet.formats.records import fastest, recorded_medians
from mobilenet.machine import cpu, machine

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
ENGINES = (
    "eager-fused", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8",
    "openvino-bf16", "executorch", "executorch-int8", "litert", "litert-int8",
)  # fmt: skip


def _not_here(engines: list[str], models: list[str]) -> dict[str, str]:
    """The engines this machine cannot run for these models, with the reason each gives
    (openvino-bf16 on a CPU without bf16)."""
    from mobilenet.formats import BenchCase, engine_named

    reasons = {}
    for name in engines:
        for model in models:
            reason = engine_named(name).refuses(BenchCase(model))
            if reason:
                reasons[name] = reason
    return reasons


def _float_predict() -> tuple[str, ...]:
    """The float32 engines ``predict --engine auto`` chooses among (from the registry)."""
    from mobilenet.classification.predict import predict_engines

    return tuple(e for e in predict_engines() if e != "auto")


def _int8() -> tuple[str, ...]:
    from mobilenet.formats import engines

    return tuple(name for name, e in engines().items() if e.precision == "int8")


def _engines() -> list[str]:
    """The engines of ENGINES this install can run (bench refuses unknown ones)."""
    from mobilenet.bench import ENGINES as KNOWN
    from mobilenet.bench import missing_extra

    names = [e for e in ENGINES if e in KNOWN and missing_extra(e) is None]
    if not available("openvino"):
        names = [e for e in names if not e.startswith("openvino")]
    return names


def bench_point(
    model: str, batch: int, threads: int, home: Path, engines: list[str], attempts: int = 3
) -> dict:
    from mobilenet.export.executorch import MAX_BATCH

    if batch > MAX_BATCH:  # an ExecuTorch program holds batches of 1 to MAX_BATCH
        engines = [e for e in engines if not e.startswith("executorch")]
    rounds, iterations = (7, 20) if batch == 1 else (5, 2)
    command = [
        sys.executable, "-m", "mobilenet", "bench", model, "--batch", str(batch),
        "--threads", str(threads), "--engines", ",".join(engines), "--rounds", str(rounds),
        "--iterations", str(iterations), "--json", "--save",
    ]  # fmt: skip
    env = {**os.environ, "MOBILENET_HOME": str(home), "OMP_NUM_THREADS": str(threads)}
    for attempt in range(attempts):
        start = time.perf_counter()
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        result = json.loads(out.stdout)
        result["wall_s"] = round(time.perf_counter() - start, 1)
        result["attempt"] = attempt + 1
        busy = result.get("busy_other_cores")
        if busy is None or busy <= BUSY_WARNING or attempt == attempts - 1:
            break
        print(f"  {model} b{batch} t{threads}: {busy} cores busy elsewhere, again", flush=True)
    result["command"] = " ".join(["mobilenet", *command[3:]])
    return result


def judge(result: dict, home: Path) -> dict:
    """auto's pick for float weights from the saved records, the fastest float and int8
    engines of the point, and the two ratios the deployment goals are stated in."""
    medians = {row["engine"]: row["median_ms"] for row in result["engines"]}
    floats = {e: m for e, m in medians.items() if e in _float_predict()}
    os.environ["MOBILENET_HOME"] = str(home)
    recorded = recorded_medians(
        result["model"], 1.0, result["batch"], result["resolution"], result["threads"]
    )
    auto = fastest(recorded, [e for e in _float_predict() if e in floats])
    best_float = min(floats, key=floats.get) if floats else None
    int8 = {e: m for e, m in medians.items() if e in _int8()}
    best_int8 = min(int8, key=int8.get) if int8 else None
    verdict = {
        "auto": auto,
        "fastest_float": best_float,
        "auto_over_fastest_float": round(medians[auto] / floats[best_float], 3)
        if auto and best_float
        else None,
        "fastest_overall": min(medians, key=medians.get),
        "fastest_int8": best_int8,
    }
    others = {e: m for e, m in int8.items() if e != "executorch-int8"}
    if others and "executorch-int8" in int8:
        ours = min(others, key=others.get)
        verdict["our_fastest_int8"] = ours
        verdict["ours_over_executorch_int8"] = round(others[ours] / int8["executorch-int8"], 3)
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--engines", default=None, help="comma-separated (default: ENGINES)")
    parser.add_argument("--attempts", type=int, default=3, help="runs of a disturbed point")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("engine_grid.json"))
    args = parser.parse_args()
    engines = _engines() if args.engines is None else args.engines.split(",")
    not_here = _not_here(engines, args.models.split(","))
    engines = [e for e in engines if e not in not_here]
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        for model in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for threads in (int(t) for t in args.threads.split(",")):
                    result = bench_point(model, batch, threads, home, engines, args.attempts)
                    result["verdict"] = judge(result, home)
                    points.append(result)
                    _print_point(result)
                    record = {
                        "command": " ".join(["python", *sys.argv]),
                        "machine": machine(),
                        "cpu": cpu(),
                        "engines": engines,
                        "not_run_here": not_here,
                        "points": points,
                    }
                    args.json.write_text(json.dumps(record, indent=2) + "\n")  # each point


def _print_point(result: dict) -> None:
    v = result["verdict"]
    print(
        f"{result['model']:<20} batch {result['batch']:>2} threads {result['threads']} "
        f"(others busy {result['busy_other_cores']} cores)",
        flush=True,
    )
    for row in sorted(result["engines"], key=lambda r: r["median_ms"]):
        print(f"    {row['engine']:<18} {row['median_ms']:9.2f} ms")
    print(
        f"    auto: {v['auto']} ({v['auto_over_fastest_float']}x the fastest float, "
        f"{v['fastest_float']}); fastest int8 {v['fastest_int8']}; ours / executorch-int8 "
        f"{v.get('ours_over_executorch_int8')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
