"""``mobilenet quantize``: int8 models of trained weights, in every format that runs them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MobileNetError
from ..formats import Format, QuantizeRequest, formats
from .tasks import task_named
from .train import checkpoint_task_of

__all__ = ["cmd_quantize", "quantize_formats"]

# Flags of one quantization method: dest -> (method, flag).
_METHOD_FLAGS = {
    "calibration_images": ("ptq", "--calibration-images"),
    "epochs": ("qat", "--epochs"),
    "lr": ("qat", "--lr"),
    "batch_size": ("qat", "--batch-size"),
    "run": ("qat", "--run"),
    "resume": ("qat", "--resume"),
    "ema_decay": ("qat", "--ema-decay"),
}


DEFAULT_FORMAT = "torch"  # where --out's suffix names no format: PyTorch int8 safetensors


def quantize_formats() -> dict[str, Format]:
    """The formats ``quantize`` writes, by name."""
    return {name: f for name, f in formats().items() if f.quantizes}


def cmd_quantize(args: argparse.Namespace) -> int:
    fmt = _quantize_format(args)
    task = checkpoint_task_of(args.weights, args.model)
    commands = task_named(task)
    if not commands.quantizes:  # before the calibration data is read
        raise MobileNetError(f"quantize takes classifiers; {args.weights} holds a {task} model")
    if task not in fmt.tasks:  # e.g. an encoder's int8 PyTorch file: nothing here reads it
        takes = [f"--format {n}" for n, f in quantize_formats().items() if task in f.tasks]
        raise MobileNetError(f"{task} models quantize to {' or '.join(takes)} only")
    trained = commands.trained_for_quantize(args)
    fmt.require(f"{fmt.name} quantization")  # before the calibration data is read
    if args.method == "qat":
        how = _train_qat(trained, args)
    else:
        request = QuantizeRequest(
            data=args.data,
            out=Path(args.out),
            images=args.calibration_images or 512,
            integer_only=args.integer_only,
            progress=lambda message: print(message, file=sys.stderr, flush=True),
        )
        how = fmt.quantize(trained, request)
    out = args.out
    # A model without classes (an encoder) has no score for eval to measure.
    hint = (
        f"; evaluate it with `mobilenet eval --weights {out} --data ...`" if trained.classes else ""
    )
    print(f"wrote {out}: {trained.model.config.name} int8 ({how}; per-channel weights){hint}")
    return 0


def _train_qat(trained, args: argparse.Namespace) -> str:
    """Quantization-aware training on the engine, in its run folder; the best int8 epoch
    is written to ``--out``."""
    from ..classification.qat import QATConfig, quantize_aware, run_folder_of

    given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    cfg = QATConfig(
        data=args.data,
        out=Path(args.run) if args.run else run_folder_of(args.out),
        ema_decay=args.ema_decay,
        resume=bool(args.resume),
        **{k: v for k, v in given.items() if v is not None},
    )
    result = quantize_aware(trained, cfg, args.out)
    return (
        f"PyTorch x86, {cfg.epochs} epochs of QAT on {args.data}, best epoch "
        f"{result.best_epoch}; the run is in {cfg.out}"
    )


def _quantize_format(args: argparse.Namespace) -> Format:
    """The format ``quantize`` writes (``--format``, else the suffix of ``--out``), with
    every flag that format or ``--method`` would ignore refused."""
    written = quantize_formats()
    suffix = Path(args.out).suffix
    implied = next((n for n, f in written.items() if f.names_files and f.suffix == suffix), None)
    fmt = written[args.format or implied or DEFAULT_FORMAT]
    # A PyTorch int8 file may have any name; the others are read back by their suffix.
    if implied not in (None, fmt.name) or (fmt.names_files and suffix != fmt.suffix):
        name = Path(args.out).name
        raise MobileNetError(f"--format {fmt.name} writes a {fmt.suffix} file, not {name}")
    if args.integer_only and not fmt.integer_only:
        takes = " and ".join(n for n, f in written.items() if f.integer_only)
        raise MobileNetError(f"--integer-only applies to --format {takes}, not {fmt.name}")
    if args.method not in fmt.methods:
        takes = [n for n, f in written.items() if args.method in f.methods]
        raise MobileNetError(
            f"--method {args.method} writes {' or '.join(takes)} int8 models: use --format "
            f"{takes[0]}"
        )
    for dest, (method, flag) in _METHOD_FLAGS.items():
        if method != args.method and getattr(args, dest) is not None:
            raise MobileNetError(f"{flag} applies to --method {method}, not {args.method}")
    return fmt
