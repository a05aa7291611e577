"""int8 post-training quantization through ONNX Runtime (static, QDQ, per-channel weights).

The float model is exported (BatchNorm folded), activation ranges are calibrated on
images from the user's data with the evaluation transform, and ONNX Runtime's
``quantize_static`` writes a QDQ model: int8 weights per output channel, uint8
activations. The file keeps the model's config, classes and resolution as metadata, so
``mobilenet eval`` and ``mobilenet predict`` take it like any weights file, and the number
of images it was calibrated on (``calibration_images``).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..extras import require
from ..fileio import atomic_write
from .int8 import calibration_batches, calibration_count, calibration_dataset
from .onnx import export_onnx, onnx_session, read_metadata, set_metadata
from .qdq import fold_marked_scales, integer_friendly, pad_depthwise

__all__ = ["calibration_images_of", "quantize_file", "quantize_onnx"]


def _calibration_batches(dataset, images: int, seed: int) -> Iterator[dict]:
    generator = torch.Generator().manual_seed(seed)
    for batch in calibration_batches(dataset, images, generator):
        yield {"images": batch.numpy().astype(np.float32)}


def calibration_images_of(path: str | Path) -> int | None:
    """How many images an int8 ONNX file of :func:`quantize_onnx` was calibrated on (None
    for a file that does not say)."""
    value = read_metadata(onnx_session(path)).get("calibration_images", "")
    return int(value) if value.isdigit() else None


def quantize_file(src: str | Path, dst: str | Path, batches: Iterator[dict]) -> None:
    """Quantize a float ONNX file to int8 QDQ, calibrating on ``batches`` of inputs."""
    for module in ("onnx", "onnxruntime"):
        require(module, "deploy", "ONNX quantization")
    quantization = require("onnxruntime.quantization", "deploy", "ONNX quantization")
    shape_inference = require(
        "onnxruntime.quantization.shape_inference", "deploy", "ONNX quantization"
    )
    QuantFormat, QuantType = quantization.QuantFormat, quantization.QuantType

    class Reader(quantization.CalibrationDataReader):
        def get_next(self):
            return next(batches, None)

    onnx = require("onnx", "deploy", "ONNX quantization")
    with tempfile.TemporaryDirectory() as tmp:
        pre, integer = Path(tmp) / "pre.onnx", Path(tmp) / "integer.onnx"
        # shape inference and graph clean-up
        shape_inference.quant_pre_process(str(src), str(pre))
        model = integer_friendly(onnx.load(str(pre)))
        pad_depthwise(model)
        onnx.save(model, str(integer))
        quantization.quantize_static(
            str(integer),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
        )
        quantized = onnx.load(str(dst))
        fold_marked_scales(quantized)
        onnx.save(quantized, str(dst))


def quantize_onnx(
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write an int8 QDQ ONNX model of ``trained`` calibrated on ``calibration_images``
    images of ``data``: all it holds when that is fewer (``progress`` is told; the file's
    metadata, read by :func:`calibration_images_of`, says how many were used)."""
    for module in ("onnx", "onnxruntime"):  # before the export and the calibration data
        require(module, "deploy", "ONNX quantization")
    out = Path(out)
    dataset = calibration_dataset(trained, data)  # a bad --data is refused before the export
    used = calibration_count(dataset, calibration_images, data, progress)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        classes = json.dumps(trained.classes)
        preprocess = trained.eval_preprocess().to_json()
        float_meta = {"classes": classes, "preprocess": preprocess}
        export_onnx(trained.model, fp32, trained.resolution, metadata=float_meta)
        metadata = {
            **read_metadata(onnx_session(fp32)),
            "precision": "int8",
            "calibration_images": str(used),
        }

        def write(target: Path) -> None:
            batches = _calibration_batches(dataset, used, seed)
            quantize_file(fp32, target, batches)
            set_metadata(target, metadata)
            onnx_session(target)  # it must load

        atomic_write(out, write)
    return out
