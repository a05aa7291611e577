"""``mobilenet quantize``: int8 models of trained weights, in every format that runs them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MobileNetError
from .train import checkpoint_task_of

__all__ = ["QUANTIZE_SUFFIXES", "cmd_quantize"]

# quantize --format -> the file it writes; eval and predict tell the formats by the suffix
QUANTIZE_SUFFIXES = {"torch": ".safetensors", "onnx": ".onnx", "pte": ".pte", "tflite": ".tflite"}
# Flags of one quantization method: dest -> (method, flag).
_METHOD_FLAGS = {
    "calibration_images": ("ptq", "--calibration-images"),
    "epochs": ("qat", "--epochs"),
    "lr": ("qat", "--lr"),
    "batch_size": ("qat", "--batch-size"),
}


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..inference import load_trained
    from ..models.base import DeployedModel

    fmt = _quantize_format(args)
    task = checkpoint_task_of(args.weights, args.model)
    if task != "classification":  # before the calibration data is read
        raise MobileNetError(f"quantize takes classifiers; {args.weights} holds a {task} model")
    trained = load_trained(args.weights, args.model)
    if isinstance(trained.model, DeployedModel):
        raise MobileNetError(f"{args.weights} is already exported: quantize the float weights")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    images = args.calibration_images or 512
    if fmt == "onnx":
        from ..export.onnx import onnx_session, read_metadata
        from ..export.quantize import quantize_onnx

        out = quantize_onnx(
            trained, args.data, args.out, images, progress=log, integer_only=args.integer_only
        )
        written = read_metadata(onnx_session(out))  # what the file says, not a second guess
        kept = written["float_modules"].replace(",", ", ")
        every = f"{kept} in float32, " if kept else "every operator in int8, "
        used = written["calibration_images"]
        how = f"ONNX QDQ, {every}calibrated on {used} images of {args.data}"
    elif fmt == "pte":
        from ..export.executorch import quantize_pte

        used, diff = quantize_pte(
            trained, args.data, args.out, images, progress=log, integer_only=args.integer_only
        )
        out = args.out
        every = "every operator in int8, " if args.integer_only else ""
        how = (
            f"ExecuTorch program for XNNPACK, {every}calibrated on {used} images of {args.data}; "
            f"max abs difference from the float model {diff:.2e}"
        )
    elif fmt == "tflite":
        from ..export.litert import quantize_tflite

        used, diff = quantize_tflite(trained, args.data, args.out, images, progress=log)
        out = args.out
        how = (
            f"full-integer LiteRT model, batch 1 (larger batches run image by image), "
            f"calibrated on {used} images of {args.data}; "
            f"max abs difference from the float model {diff:.2e}"
        )
    else:
        out, how = _quantize_torch(args, trained, images, log)
    print(
        f"wrote {out}: {trained.model.config.name} int8 ({how}; per-channel weights); "
        f"evaluate it with `mobilenet eval --weights {out} --data ...`"
    )
    return 0


def _quantize_format(args: argparse.Namespace) -> str:
    """The format ``quantize`` writes (``--format``, else the suffix of ``--out``), with
    every flag that format or ``--method`` would ignore refused."""
    suffix = Path(args.out).suffix
    implied = next((f for f, s in QUANTIZE_SUFFIXES.items() if s == suffix), None)
    fmt = args.format or implied or "torch"
    # A PyTorch int8 file may have any name; the others are read back by their suffix.
    if implied not in (None, fmt) or (fmt != "torch" and suffix != QUANTIZE_SUFFIXES[fmt]):
        raise MobileNetError(
            f"--format {fmt} writes a {QUANTIZE_SUFFIXES[fmt]} file, not {Path(args.out).name}"
        )
    if args.integer_only and fmt not in ("pte", "onnx"):
        raise MobileNetError(f"--integer-only applies to --format pte and onnx, not {fmt}")
    if fmt != "torch" and args.method == "qat":
        raise MobileNetError("--method qat writes PyTorch int8 models: use --format torch")
    for dest, (method, flag) in _METHOD_FLAGS.items():
        if method != args.method and getattr(args, dest) is not None:
            raise MobileNetError(f"{flag} applies to --method {method}, not {args.method}")
    return fmt


def _quantize_torch(args: argparse.Namespace, trained, images: int, log) -> tuple[str, str]:
    """PyTorch int8 (x86), PTQ or QAT: the file written and how it was made."""
    from ..export.int8 import QATConfig, quantize_torch, save_int8

    given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    qat = QATConfig(**{k: v for k, v in given.items() if v is not None})
    model = quantize_torch(trained, args.data, args.method, images, qat, progress=log)
    out = save_int8(model, args.out, trained.classes, trained.resolution)
    if args.method == "ptq":
        how = f"PyTorch x86, calibrated on {model.calibration_images} images of {args.data}"
    else:
        how = f"PyTorch x86, {qat.epochs} epochs of QAT on {args.data}"
    return str(out), how
