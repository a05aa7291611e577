"""Record `mobilenet bench` tables for V2, V3-Large and V3-Small at batch 1 and 32, 1 and 2
threads, into benchmarks/inference_bench.json (and print them).

Each table is headed by the CPU, its ISA features and the cores other processes kept busy
during that run; the JSON keeps them with every result, and the ratios to the best peer
engine of the run (``ratio_to_best``) next to those to eager PyTorch. Record on a quiet
machine: the script ends by naming the runs that other processes slowed.

    python benchmarks/inference_bench.py [--engines LIST] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mobilenet.bench import (
    BUSY_WARNING,
    ENGINES,
    BenchConfig,
    format_table,
    run_bench,
)
from mobilenet.machine import cpu, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    parser.add_argument("--models", default="mobilenet_v2,mobilenet_v3_large,mobilenet_v3_small")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("inference_bench.json")
    )
    args = parser.parse_args()
    results = []
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for threads in (1, 2):
                iterations = 10 if batch == 1 else 2
                cfg = BenchConfig(model, 1.0, batch, 224, threads, args.rounds, iterations)
                result = run_bench(cfg, args.engines.split(","))
                print(format_table(result), "\n", flush=True)
                results.append(result)
    record = {
        "machine": machine(),
        "cpu": cpu(),
        "command": "python benchmarks/inference_bench.py " + " ".join(sys.argv[1:]),
        "note": args.note,
        "results": results,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    busy = [r for r in results if (r["busy_other_cores"] or 0) > BUSY_WARNING]
    for r in busy:
        print(
            f"busy machine: {r['model']} batch {r['batch']}, {r['threads']} thread(s): "
            f"{r['busy_other_cores']:.2f} cores taken by other processes; record it again",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
