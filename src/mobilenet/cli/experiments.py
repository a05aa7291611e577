"""``mobilenet memory`` and ``mobilenet experiment``: the papers' claims, measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MobileNetError
from .args import model_name, positive_int, resolution_hw, width

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "memory", help="peak activation memory: standard vs memory-efficient (V2 Section 5.1)"
    )
    p.add_argument(
        "model",
        type=model_name(("classification", "segmentation")),
        help="a V2 or V3 classifier, or a segmentation model on one",
    )
    p.add_argument("--width-mult", type=width, default=1.0, help="width multiplier alpha")
    # Checked by memory_efficient, whose message also names the block's channel count.
    p.add_argument("--splits", type=int, default=4, help="channel groups t per block (>= 1)")
    p.add_argument("--resolution", type=resolution_hw, default=224, help="N or HxW")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--band-rows", type=positive_int, default=16, help="rows per tiled band")
    p.add_argument("--no-tiling", dest="band_rows", action="store_const", const=None)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=3, help="timed calls per forward")
    p.add_argument(
        "--output",
        choices=("logits", "labels"),
        default="logits",
        help="what the executor returns: the logits, or a segmentation model's label map",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser(
        "experiment",
        help="reproduce a claim of the papers: plots, JSON/CSV and a report",
        description="Run one experiment into --out (default experiments/NAME): PNG plots, "
        "results.json/.csv and report.md. --list shows them all.",
    )
    p.add_argument("name", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list the experiments")
    p.add_argument("--out", help="output folder (default: experiments/NAME)")
    p.add_argument("--quick", action="store_true", help="a smaller run: minutes on 2 cores")
    p.add_argument("--data", help="training ablations: image folder or built-in dataset")
    p.add_argument("--seeds", type=positive_int, help="training ablations: number of seeds")
    p.add_argument("--epochs", type=positive_int, help="training ablations: epochs per run")
    p.add_argument("--runs", nargs="+", help="tradeoff: training run folders to plot")
    p.set_defaults(func=cmd_experiment)


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from ..memory import format_report, memory_report
    from ..memory.labels import format_labels_report, labels_report

    torch.set_num_threads(args.threads)
    run, show = memory_report, format_report
    if args.output == "labels":  # a segmentation model's label map, computed band by band
        run, show = labels_report, format_labels_report
    report = run(
        args.model,
        args.width_mult,
        args.splits,
        args.resolution,
        args.batch,
        args.band_rows,
        args.repeats,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else show(report))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from ..experiments import EXPERIMENTS, run_experiment

    if args.list or args.name is None:
        if args.name is None and not args.list:
            raise MobileNetError("name an experiment, or pass --list")
        width = max(len(name) for name in EXPERIMENTS)
        for experiment in EXPERIMENTS.values():
            print(f"{experiment.name:<{width}}  {experiment.claim}")
        return 0
    out = Path(args.out or Path("experiments") / args.name)
    options = {"data": args.data, "seeds": args.seeds, "epochs": args.epochs, "runs": args.runs}
    summary = run_experiment(args.name, out, args.quick, **options)
    print(f"{args.name}: wrote {out}/report.md")
    print(json.dumps(summary))
    return 0
