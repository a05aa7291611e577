"""The ``mobilenet`` command line: ``mobilenet cost``, ``mobilenet convert``, ``mobilenet list``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .cost import LAYER_TYPES, Cost, check_resolution, cost
from .errors import MobileNetError
from .models import create_model, list_models

__all__ = ["main"]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


_width = _positive_float  # the width multiplier alpha: any positive number


def _resolution(text: str) -> int:
    try:
        return check_resolution(int(text))
    except MobileNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 32, got {text!r}") from None


def _classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    return _classes(text)


def _positive_float(text: str) -> float:
    return _width(text)


def _model_name(text: str) -> str:
    if text not in list_models():
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose from: {', '.join(list_models())}"
        )
    return text


def _any_model_name(text: str) -> str:
    """A classifier or a detector (``mobilenet cost``, ``mobilenet export``)."""
    if text not in list_models(task=None):
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose from: {', '.join(list_models(task=None))}"
        )
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width-mult", type=_width, default=1.0, help="width multiplier alpha")
    p.add_argument("--num-classes", type=_classes, default=None, help="classifier outputs")


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mobilenet",
        description="The MobileNet family (V1, V2, V3), as the papers describe it.",
    )
    parser.add_argument("--version", action="version", version=f"mobilenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the registered models and official checkpoints")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cost", help="params, multiply-adds and activation memory of a model")
    p.add_argument(
        "model", nargs="?", type=_any_model_name, help="model name (see `mobilenet list`)"
    )
    p.add_argument("--all", action="store_true", help="one row per registered model")
    _add_model_args(p)
    p.add_argument("--resolution", type=_resolution, default=224, help="input size (>= 32)")
    p.add_argument("--per-layer", action="store_true", help="also list every layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("convert", help="convert a torchvision/timm checkpoint to safetensors")
    p.add_argument("src", help="checkpoint: torchvision or timm state dict, or ours")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", required=True, type=_model_name, help="model name")
    _add_model_args(p)
    p.set_defaults(func=cmd_convert)

    _add_train_parser(sub)

    from .detection.cli import add_detect_parser

    add_detect_parser(sub)

    p = sub.add_parser("export", help="export to ONNX or TorchScript, checked against PyTorch")
    p.add_argument("--model", required=True, type=_any_model_name, help="model name")
    _add_model_args(p)
    p.add_argument("--weights", help="checkpoint (any format load_weights accepts)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--resolution", type=_resolution, default=None, help="input size")
    p.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default 17)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        help="int8 quantization: post-training or quantization-aware, PyTorch or ONNX",
        description="PTQ calibrates activation ranges on --calibration-images images; QAT "
        "fine-tunes with fake quantization for --epochs epochs (PyTorch format only). The "
        "format follows --out (.onnx: ONNX Runtime QDQ; otherwise PyTorch int8 safetensors).",
    )
    p.add_argument("--model", type=_model_name, help="needed for torchvision/timm checkpoints")
    p.add_argument("--weights", required=True, help="trained weights (best.safetensors, ...)")
    p.add_argument("--data", required=True, help="calibration images: folder or mnist/digits")
    p.add_argument("--method", choices=["ptq", "qat"], default="ptq")
    p.add_argument("--format", choices=["torch", "onnx"], default=None)
    p.add_argument("--calibration-images", type=_positive_int, default=512, help="PTQ")
    p.add_argument("--epochs", type=_positive_int, default=3, help="QAT fine-tuning epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="QAT learning rate (SGD)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="QAT batch size")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="time every inference engine on this machine")
    p.add_argument("model", type=_model_name, help="model name")
    p.add_argument("--width-mult", type=_width, default=1.0, help="width multiplier alpha")
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--resolution", type=_resolution, default=224)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--engines", default=None, help="comma-separated (default: all)")
    p.add_argument("--rounds", type=_positive_int, default=7, help="interleaved rounds")
    p.add_argument("--iterations", type=_positive_int, default=10, help="calls per round")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "memory", help="peak activation memory: standard vs memory-efficient (V2 Section 5.1)"
    )
    p.add_argument("model", type=_model_name, help="an inverted-residual model (V2, V3)")
    p.add_argument("--width-mult", type=_width, default=1.0, help="width multiplier alpha")
    p.add_argument("--splits", type=int, default=4, help="channel groups t per block (>= 1)")
    p.add_argument("--resolution", type=_resolution, default=224)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--band-rows", type=_positive_int, default=16, help="rows per tiled band")
    p.add_argument("--no-tiling", dest="band_rows", action="store_const", const=None)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed calls per forward")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("eval", help="top-1 / top-5 / loss of trained weights on a dataset")
    p.add_argument("--weights", required=True, help="best.safetensors, or any checkpoint")
    p.add_argument("--data", required=True, help="image folder or built-in dataset (mnist, digits)")
    p.add_argument("--model", type=_model_name, help="needed for torchvision/timm checkpoints")
    p.add_argument("--width-mult", type=_width, default=None, help="width multiplier alpha")
    p.add_argument("--resolution", type=_resolution, default=None, help="input size")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=_non_negative_int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify images: the top-5 classes of each")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, help="best.safetensors, or any checkpoint")
    p.add_argument("--model", type=_model_name, help="needed for torchvision/timm checkpoints")
    p.add_argument("--width-mult", type=_width, default=None, help="width multiplier alpha")
    p.add_argument("--resolution", type=_resolution, default=None, help="input size")
    p.add_argument("--top", type=_positive_int, default=5)
    p.add_argument(
        "--engine",
        choices=["onnxruntime", "eager-fused", "eager"],
        default="onnxruntime",
        help="onnxruntime (default: the fastest in `mobilenet bench`), eager-fused, eager",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

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
    p.add_argument("--seeds", type=_positive_int, help="training ablations: number of seeds")
    p.add_argument("--epochs", type=_positive_int, help="training ablations: epochs per run")
    p.add_argument("--runs", nargs="+", help="tradeoff: training run folders to plot")
    p.set_defaults(func=cmd_experiment)
    return parser


def _add_train_parser(sub) -> None:
    from .train.recipes import RECIPES

    p = sub.add_parser(
        "train",
        help="train or fine-tune on an image folder or a built-in dataset",
        description="Train on one process, or on many under torchrun "
        "(torchrun --nproc-per-node N -m mobilenet train ...).",
    )
    p.add_argument("--model", type=_model_name, default="mobilenet_v3_small")
    p.add_argument("--width-mult", type=_width, default=1.0, help="width multiplier alpha")
    p.add_argument(
        "--data",
        required=True,
        help="image folder (one sub-folder per class) or a built-in dataset: mnist, digits",
    )
    p.add_argument("--val-data", help="separate validation image folder")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share of --data held out when there is no --val-data (default 0.1)",
    )
    p.add_argument("--recipe", default="demo", help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--epochs", type=_positive_int, help="override the recipe's epochs")
    p.add_argument("--batch-size", type=_positive_int, help="global batch size (all processes)")
    p.add_argument(
        "--lr",
        type=_positive_float,
        help="learning rate (default: the recipe's, scaled to the batch size)",
    )
    p.add_argument("--resolution", type=_resolution, help="training input size")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--pretrained", help="start from these weights (classifier reset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_non_negative_int, default=2, help="data loading processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.set_defaults(func=cmd_train)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except MobileNetError as e:
        print(f"mobilenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mobilenet cost --all --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    from .weights import PRETRAINED

    print("models:")
    for name in list_models():
        print(f"  {name}")
    print("detectors (mobilenet detect):")
    for name in list_models(task="detection"):
        print(f"  {name}")
    print("official checkpoints (create_model(name, weights=...)):")
    for key, entry in PRETRAINED.items():
        print(f"  {key:<30} top-1 {entry.top1:.2f}%  {entry.url}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    if args.all == (args.model is not None):
        raise MobileNetError("give a model name or --all (not both)")
    names = list_models() if args.all else [args.model]
    kwargs: dict = {"width_mult": args.width_mult}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    costs = [cost(create_model(name, **kwargs), args.resolution) for name in names]
    if args.json:
        dicts = [c.to_dict(per_layer=args.per_layer) for c in costs]
        print(json.dumps(dicts if args.all else dicts[0], indent=2))
        return 0
    print(_summary_table(costs))
    if not args.all:
        print()
        print(_type_table(costs[0]))
    if args.per_layer:
        for c in costs:
            print()
            print(_layer_table(c))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import detect_source, load_weights, read_checkpoint, save_weights

    state_dict, metadata = read_checkpoint(args.src)
    kwargs: dict = {"width_mult": args.width_mult}
    if args.num_classes is None:
        from .weights import infer_num_classes

        kwargs["num_classes"] = infer_num_classes(state_dict)
    else:
        kwargs["num_classes"] = args.num_classes
    model = create_model(args.model, **kwargs)
    source = detect_source(state_dict)
    load_weights(model, state_dict, source_name=args.src, metadata=metadata)
    save_weights(model, args.dst, {"converted_from": source})
    cfg = model.config
    print(
        f"wrote {args.dst}: {cfg.name} (width {cfg.width_mult}, {cfg.num_classes} classes, "
        f"BatchNorm eps {cfg.bn_eps:g}) from a {source} checkpoint"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, get_recipe, train

    recipe = get_recipe(
        args.recipe, epochs=args.epochs, batch_size=args.batch_size, resolution=args.resolution
    )
    cfg = TrainConfig(
        model=args.model,
        data=args.data,
        out=Path(args.out),
        recipe=recipe,
        width_mult=args.width_mult,
        val_data=args.val_data,
        val_fraction=args.val_fraction,
        lr=args.lr,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        pretrained=args.pretrained,
        resume=args.resume,
        progress=not args.quiet,
    )
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        best = f"{result.best_top1:.2f}% (epoch {result.best_epoch})" if result.best_top1 else "-"
        print(
            f"done in {result.seconds:.0f} s: best validation top-1 {best}\n"
            f"  weights  {result.out / 'best.safetensors'}\n"
            f"  curves   {result.out / 'curves.png'}\n"
            f"  metrics  {result.out / 'metrics.csv'}"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.onnx import DEFAULT_OPSET, export_onnx, export_torchscript

    if args.model in list_models(task="detection"):
        from .detection.cli import export_detector

        return export_detector(args)
    if args.weights:
        from .inference import load_trained

        trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
        if trained.model.config.name != args.model:
            raise MobileNetError(
                f"{args.weights} holds {trained.model.config.name}, not {args.model}"
            )
        model, resolution = trained.model, trained.resolution
    else:  # random initialisation: for checking a deployment path, not for use
        kwargs: dict = {"width_mult": args.width_mult}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        model, resolution = create_model(args.model, **kwargs), args.resolution or 224
    if args.format == "onnx":
        diff = export_onnx(model, args.out, resolution, args.opset or DEFAULT_OPSET)
        checked = "ONNX Runtime"
    else:
        diff = export_torchscript(model, args.out, resolution)
        checked = "TorchScript"
    print(
        f"wrote {args.out}: {model.config.name} at {resolution}x{resolution}, dynamic batch; "
        f"{checked} vs PyTorch max abs difference {diff:.2e}"
    )
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .export.int8 import QATConfig, quantize_torch, save_int8
    from .export.quantize import quantize_onnx
    from .inference import load_trained
    from .models.base import DeployedModel

    fmt = args.format or ("onnx" if args.out.endswith(".onnx") else "torch")
    if fmt == "onnx" and args.method == "qat":
        raise MobileNetError("--method qat writes PyTorch int8 models: use --format torch")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise MobileNetError(f"--lr must be positive, got {args.lr}")
    trained = load_trained(args.weights, args.model)
    if isinstance(trained.model, DeployedModel):
        raise MobileNetError(f"{args.weights} is already exported: quantize the float weights")
    name = trained.model.config.name
    if fmt == "onnx":
        out = quantize_onnx(trained, args.data, args.out, args.calibration_images)
        how = f"ONNX QDQ, calibrated on {args.calibration_images} images of {args.data}"
    else:
        qat = QATConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
        log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
        model = quantize_torch(
            trained, args.data, args.method, args.calibration_images, qat, progress=log
        )
        out = save_int8(model, args.out, trained.classes, trained.resolution)
        how = (
            f"PyTorch x86, calibrated on {args.calibration_images} images of {args.data}"
            if args.method == "ptq"
            else f"PyTorch x86, {args.epochs} epochs of QAT on {args.data}"
        )
    print(
        f"wrote {out}: {name} int8 ({how}; per-channel weights); evaluate it with "
        f"`mobilenet eval --weights {out} --data ...`"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import ENGINES, BenchConfig, check_engines, format_table, run_bench

    engines = args.engines.split(",") if args.engines else list(ENGINES)
    engines = check_engines([e.strip() for e in engines if e.strip()], args.model, args.width_mult)
    cfg = BenchConfig(
        args.model, args.width_mult, args.batch, args.resolution, args.threads, args.rounds,
        args.iterations,
    )  # fmt: skip
    result = run_bench(cfg, engines, progress=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    import torch

    from .memory import format_report, memory_report

    torch.set_num_threads(args.threads)
    report = memory_report(
        args.model, args.width_mult, args.splits, args.resolution, args.batch, args.band_rows,
        args.repeats,
    )  # fmt: skip
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, run_experiment

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


def cmd_eval(args: argparse.Namespace) -> int:
    from .inference import evaluate_on, load_trained

    trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
    metrics = evaluate_on(trained, args.data, args.batch_size, args.workers, args.device)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{trained.model.config.name} on {args.data}: top-1 {metrics['top1']:.2f}%  "
            f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
            f"({metrics['images']} images at {trained.resolution}x{trained.resolution})"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import load_trained, predict

    trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
    results = predict(trained, args.images, args.top, args.engine)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for entry in result["top"]:
            print(f"  {entry['probability']:7.2%}  {entry['class']}")
    return 0


# --------------------------------------------------------------------------- tables


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def _summary_table(costs: Sequence[Cost]) -> str:
    header = ["model", "width", "res", "params", "MAdds", "largest act", "peak act (fp32)"]
    rows = [
        [
            c.model,
            f"{c.width_mult:g}",
            str(c.resolution),
            f"{c.params:,}",
            f"{c.madds / 1e6:,.1f}M",
            _mb(c.largest_activation_bytes),
            _mb(c.peak_activation_bytes),
        ]
        for c in costs
    ]
    return _table(header, rows, right={1, 2, 3, 4, 5, 6})


def _type_table(c: Cost) -> str:
    header = ["layer type", "params", "share", "MAdds", "share"]
    rows = []
    for kind, v in c.by_type.items():
        if kind not in LAYER_TYPES and not v["params"]:
            continue
        rows.append(
            [
                kind,
                f"{v['params']:,}",
                f"{100 * v['params'] / c.params:.2f}%",
                f"{v['madds']:,}",
                f"{100 * v['madds'] / c.madds:.2f}%" if c.madds else "-",
            ]
        )
    return _table(header, rows, right={1, 2, 3, 4})


def _layer_table(c: Cost) -> str:
    header = ["layer", "type", "output", "params", "MAdds"]
    rows = [
        [
            layer.name,
            layer.type,
            "x".join(map(str, layer.output_shape[1:])),
            f"{layer.params:,}",
            f"{layer.madds:,}",
        ]
        for layer in c.layers
    ]
    return f"{c.model} per layer\n" + _table(header, rows, right={3, 4})


if __name__ == "__main__":
    sys.exit(main())
