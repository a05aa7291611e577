"""Record ``mobilenet bench mobilenet_v4_conv_small``: every engine that takes MobileNetV4
(Conv-S at its 224), batch 1, 1 thread, interleaved rounds, into
benchmarks/v4_bench.json and the table into benchmarks/v4_bench.txt. The table's header
names the CPU, its ISA features and the cores other processes kept busy during the run;
compare the ratios between engines, which one interleaved run measures alike.

    python benchmarks/v4_bench.py [--threads 1] [--rounds 5] [--iterations 10]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mobilenet.bench import (
    ENGINES,
    BenchConfig,
    check_engines,
    format_table,
    run_bench,
)
from mobilenet.machine import cpu, machine

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenet_v4_conv_small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    cfg = BenchConfig(args.model, 1.0, 1, 224, args.threads, args.rounds, args.iterations)
    engines = check_engines(list(ENGINES), args.model, 1.0)
    left_out = [e for e in ENGINES if e not in engines]  # torchvision has no MobileNetV4
    result = run_bench(cfg, engines)
    table = format_table(result)
    print(table)
    command = (
        f"mobilenet bench {args.model} --threads {args.threads} --rounds {args.rounds} "
        f"--iterations {args.iterations}"
    )
    record = {
        "machine": machine(),
        "cpu": cpu(),
        "command": command,
        "script": "python benchmarks/v4_bench.py " + " ".join(sys.argv[1:]),
        "left_out": left_out,
        "result": result,
    }
    (HERE / "v4_bench.json").write_text(json.dumps(record, indent=2) + "\n")
    note = f"note: left out, not applicable here: {', '.join(left_out)}\n" if left_out else ""
    (HERE / "v4_bench.txt").write_text(f"$ {command}\n{note}{table}\n")


if __name__ == "__main__":
    main()
