"""int8 post-training quantization through ONNX Runtime (static, QDQ, per-channel weights).

The float model is exported (BatchNorm folded), activation ranges are calibrated on
images from the user's data with the evaluation transform, and ONNX Runtime's
``quantize_static`` writes a QDQ model: int8 weights per output channel, uint8
activations, and the modules :func:`float_modules` names (the stem and first block of
the models measured faster so) in float32 unless every operator is asked for in int8
(``integer_only``). The file keeps the model's config, classes and resolution as
metadata, so ``mobilenet eval`` and ``mobilenet predict`` take it like any weights file,
and the number of images it was calibrated on (``calibration_images``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..card import ModelCard
from ..extras import require
from ..fileio import atomic_write
from .calibration import calibration_batches, calibration_count, calibration_dataset
from .onnx import export_onnx, onnx_session, read_metadata, set_metadata
from .qdq import fold_marked_scales, fold_marked_shifts, integer_friendly, module_nodes
from .qdq_pad import pad_depthwise

__all__ = ["calibration_images_of", "float_modules", "quantize_file", "quantize_onnx"]

# The models whose int8 ONNX file is faster with the stem and first block in float32, by
# measurement (benchmarks/ort_float_head.json: batch 1 at 224, one thread). There the
# network works on 16 or 32 channels at half the input's resolution, where ONNX Runtime's
# int8 kernels are slower than its float ones (V3-Large's 3-channel stem conv about 2x,
# its 16-channel depthwise conv about 3.5x), and V3's stem h-swish is an integer add and
# multiply that the float conv fuses. V1 and the larger V4s, whose first block ends in 64
# channels or more at that resolution, are faster all in int8.
_FLOAT_HEAD = ("features.0", "features.1")
_FLOAT_HEAD_MODELS = frozenset(
    {
        "mobilenet_v2",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "mobilenet_v3_large_minimal",
        "mobilenet_v3_small_minimal",
        "mobilenet_v4_conv_small",
    }
)


def float_modules(name: str) -> tuple[str, ...]:
    """The modules of model ``name`` that an int8 ONNX file keeps in float32."""
    return _FLOAT_HEAD if name in _FLOAT_HEAD_MODELS else ()


def _calibration_batches(dataset, images: int, seed: int) -> Iterator[dict]:
    generator = torch.Generator().manual_seed(seed)
    for batch in calibration_batches(dataset, images, generator):
        yield {"images": batch.numpy().astype(np.float32)}


def calibration_images_of(path: str | Path) -> int | None:
    """How many images an int8 ONNX file of :func:`quantize_onnx` was calibrated on (None
    for a file that does not say)."""
    card = ModelCard.read(read_metadata(onnx_session(path)), str(path))
    value = (card.quantization or {}).get("calibration_images")
    return value if isinstance(value, int) else None


def quantize_file(
    src: str | Path, dst: str | Path, batches: Iterator[dict], keep_float: Sequence[str] = ()
) -> None:
    """Quantize a float ONNX file to int8 QDQ, calibrating on ``batches`` of inputs; the
    modules ``keep_float`` (paths such as ``features.0``) stay in float32."""
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
        model = onnx.load(str(pre))
        keep = module_nodes(model, keep_float) if keep_float else set()
        integer_friendly(model, keep)
        pad_depthwise(model, keep=keep)
        onnx.save(model, str(integer))
        quantization.quantize_static(
            str(integer),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            nodes_to_exclude=sorted(keep),
        )
        quantized = onnx.load(str(dst))
        fold_marked_scales(quantized)
        fold_marked_shifts(quantized)
        onnx.save(quantized, str(dst))


def quantize_onnx(
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    integer_only: bool = False,
) -> Path:
    """Write an int8 QDQ ONNX model of ``trained`` calibrated on ``calibration_images``
    images of ``data``: all it holds when that is fewer (``progress`` is told; the file's
    metadata, read by :func:`calibration_images_of`, says how many were used). The modules
    :func:`float_modules` names stay in float32 unless ``integer_only`` (the metadata's
    ``float_modules`` lists them)."""
    for module in ("onnx", "onnxruntime"):  # before the export and the calibration data
        require(module, "deploy", "ONNX quantization")
    out = Path(out)
    dataset = calibration_dataset(trained, data)  # a bad --data is refused before the export
    used = calibration_count(dataset, calibration_images, data, progress)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        card = trained.model_card()
        export_onnx(trained.model, fp32, trained.resolution, metadata=card.metadata())
        keep = () if integer_only else float_modules(trained.model.config.name)
        scheme = {
            "method": "ptq",
            "scheme": "onnxruntime-qdq",
            "float_modules": list(keep),
            "calibration_images": used,
            "integer_only": integer_only,
        }
        metadata = card.replace(precision="int8", quantization=scheme).metadata()

        def write(target: Path) -> None:
            batches = _calibration_batches(dataset, used, seed)
            quantize_file(fp32, target, batches, keep)
            set_metadata(target, metadata)
            onnx_session(target)  # it must load

        atomic_write(out, write)
    return out
