"""Record the label-map executor of LR-ASPP on MobileNetV3-Large at Cityscapes size
(1024x2048, batch 1, fp32): peak activation memory, the output included, against the
standard forward and the logits executor; time; and how many pixels of the label map equal
the standard forward's arg-max. Writes benchmarks/memory_labels.json and prints the table.

    python benchmarks/memory_labels.py [--repeats 3] [--threads 1] [--splits 4]

Target (the label-map issue): the whole forward, its output included, at or below 0.2x of
the standard forward's peak, which holds the model's 168 MiB of logits; the label map equal
to the standard forward's arg-max.

What is measured (:mod:`mobilenet.memory.labels`, as ``mobilenet memory --output labels``):

* **Peak memory** is observed with :class:`mobilenet.memory.PeakMemory`: the storages every
  operator allocates, from allocation to release; the input image and the weights are not
  counted, nor workspaces private to a kernel. ``measured`` counts the output (the logits,
  168 MiB; the label map, uint8, 2 MiB); ``measured_without_output`` leaves it out. The
  standard forward is the model with BatchNorm folded, NCHW, in inference mode. Memory does
  not depend on the weights: both runs below give the same figures.
* **Agreement** is counted on two models: ``default_init`` (the registered model as built:
  BatchNorm at its initial statistics, logits near 0.03, where ties are closest) and
  ``unit_scale`` (random BatchNorm statistics, logits of unit standard deviation, as
  ``benchmarks/memory_segmentation.py``). A pixel can differ only where the standard
  forward's two largest logits are closer than the executor's float rounding of them
  (``largest_gap_differing``).
* **Times**: the three forwards take turns, ``--repeats`` rounds; the machine is shared, so
  the record keeps the cores other processes kept busy meanwhile and ``uptime`` before and
  after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mobilenet.fileio import atomic_write
from mobilenet.machine import cpu, load_snapshot, machine, others_since
from mobilenet.memory.labels import compare_labels, format_labels_report, labels_report

sys.path.insert(0, str(Path(__file__).parent))
from memory_segmentation import unit_scale_model

HERE = Path(__file__).parent
NAME = "lraspp_mobilenet_v3_large"
SIZE = (1024, 2048)
TARGET = 0.2  # the label-map executor's peak over the standard forward's, output included
RUNS = ("default_init", "unit_scale")


def uptime() -> str:
    """``uptime``'s line (the load averages), or the load averages alone without it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--splits", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "memory_labels.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # the registered model's initial weights: the same draw each run
    load_before, start = uptime(), load_snapshot()
    cli = labels_report(NAME, splits=args.splits, resolution=SIZE, repeats=args.repeats)
    print(format_labels_report(cli), flush=True)
    unit = compare_labels(unit_scale_model(), args.splits, SIZE, repeats=1)
    print(format_labels_report(unit), flush=True)
    runs, m = (cli, unit), cli.measured
    ratios = {key: round(m[key] / m["standard"], 3) for key in ("logits", "labels")}
    record = {
        "command": "python benchmarks/memory_labels.py " + " ".join(sys.argv[1:]),
        "equivalent_cli": f"mobilenet memory {NAME} --resolution 1024x2048 --output labels",
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "cpu": cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "uptime_before": load_before,
        "uptime_after": uptime(),
        "busy_other_cores": others_since(start),
        "model": NAME,
        "resolution": list(SIZE),
        "splits": args.splits,
        "band_rows": cli.band_rows,
        "labels_dtype": cli.labels_dtype,
        "peak_over_standard": ratios,
        "target": TARGET,
        "met": {
            "memory": ratios["labels"] <= TARGET,
            "equal_to_logits_executor_argmax": all(r.equal_to_logits == r.pixels for r in runs),
            "equal_to_standard_argmax": {
                key: r.equal_to_standard == r.pixels for key, r in zip(RUNS, runs, strict=True)
            },
        },
        "default_init": cli.to_dict(),
        "unit_scale": unit.to_dict(),
    }
    atomic_write(args.out, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    print(json.dumps({k: record[k] for k in ("peak_over_standard", "busy_other_cores", "met")}))


if __name__ == "__main__":
    main()
