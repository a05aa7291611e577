"""Export to LiteRT (``.tflite``, formerly TensorFlow Lite), for Android, iOS and microcontrollers.

The inference-prepared model (BatchNorm folded, attention as matrix products) goes
through litert-torch, the LiteRT
converter for PyTorch, and the flatbuffer is kept in memory. Before a byte is written,
the LiteRT interpreter (``ai_edge_litert``, with its default XNNPACK delegate) loads the
bytes and runs them on batches of 1 and 3, compared with PyTorch (1e-4 on unit-scale
logits): what is written is what a device would run.
The file is sealed with the digest of its bytes (:mod:`mobilenet.integrity`), checked
when it is read; before LiteRT builds a file that this process has not just made, it
reads it in a child process (:mod:`mobilenet.native`), where a damaged file that crashes
the runtime's native code takes only the child down.

The input is NCHW float32, as for every other engine of the toolkit. The converter moves
the convolutions to NHWC inside the file either way; an NHWC input (its
``to_channel_last_io``) saves one transpose of the image, which measured the same as
NCHW (mobilenet_v2 at 224, one thread), so the layout a PyTorch user already feeds is
kept. The file is converted at batch 1 (litert-torch cannot lower the flatten of a
symbolic batch); the interpreter resizes the batch of the input, and the export checks
that at batch 3 too. Where the converter has fixed the batch of a RESHAPE at 1 (the
attention of MobileNetV5's encoder), the interpreter cannot plan another batch: the
file's metadata then says ``batch`` 1, as an int8 file's (below).

A TFLite flatbuffer has a metadata table of named buffers (the converter keeps its own
``min_runtime_version`` there). The model's config, classes and resolution, with the
dtype and input layout, are one more entry, :data:`META_NAME`, holding JSON: no sidecar
file is needed.

int8 (:func:`export_tflite_int8`) is PT2E quantization with litert-torch's quantizer (int8
weights per output channel, int8 activations), calibrated on the caller's images. The
converter makes it full-integer, input and output included: the file takes int8 images
and gives int8 logits, with their scale and zero point in the file; the runner of
:func:`read_tflite` quantizes and dequantizes, so callers pass float images either way.
It is checked against the quantized PyTorch reference it came from. The quantizer has no
h-swish: left as they are, V3's h-swish and h-sigmoid run in float between a DEQUANTIZE
and a QUANTIZE, and the int8 file ran slower than the float32 one. Written as add, clamp
and multiply (:func:`mobilenet.export.prepare.integer_activations`, the same function)
they are quantized too, and mobilenet_v3_large's int8 file runs in about half the time
(``benchmarks/litert_int8.py``). The converter then fixes the batch of the RESHAPEs it
adds around those multiplications at 1, so the interpreter cannot resize the batch of an
int8 file: its metadata says ``batch`` 1, and the runner of :func:`read_tflite` runs a
larger batch image by image (a phone classifies one image at a time anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..card import ModelCard
from ..errors import MobileNetError
from ..extras import require
from ..fileio import read_bytes, write_bytes
from ..integrity import check_seal, note_unsealed, seal, sealed_metadata
from ..native import NativeLog, quiet_native_stderr, record_verified, verify_in_child
from .calibration import calibrated_export, observe
from .check import check_against_pytorch
from .executorch import INT8_SLACK
from .int8_check import check_int8
from .metadata import model_metadata, model_name
from .prepare import delegable_forms, integer_activations, prepare_for_inference
from .pt2 import quiet_torch_export_logs
from .pt2_program import first_line

__all__ = [
    "LAYOUT",
    "META_NAME",
    "export_tflite",
    "export_tflite_int8",
    "probe_tflite",
    "quantize_tflite",
    "read_tflite",
    "tflite_batch",
    "tflite_metadata",
]

FORMAT = "mobilenet-tflite"
META_NAME = "mobilenet"  # our entry in the flatbuffer's metadata table
LAYOUT = "NCHW"  # the file's input: (batch, 3, resolution, resolution)
FIXED_BATCH = "1"  # the metadata "batch" of a file whose batch cannot be resized

_PURPOSE = "LiteRT export (.tflite)"
_RUN_PURPOSE = "running a LiteRT model (.tflite)"

Runner = Callable[[torch.Tensor], torch.Tensor]


def export_tflite(
    model: nn.Module,
    path: str | Path,
    resolution: int = 224,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as a float32 LiteRT model (NCHW input, batch 1, resizable); returns
    the max abs difference between the LiteRT interpreter and PyTorch, checked before the
    file appears. The file keeps the config, resolution and ``metadata`` (class names)."""
    _require_converter()
    model = model.eval()
    prepared = _delegable(prepare_for_inference(model, channels_last=False))
    flat = _convert(prepared, resolution, model_name(model))
    meta = _metadata(model, resolution, metadata, "float32")
    if not _batch_resizable(flat, resolution):  # see the module's docstring
        meta["batch"] = FIXED_BATCH
    data = seal(_with_metadata(flat, sealed_metadata(meta)))
    run, _ = read_tflite(data, "the exported model", threads=1, verify=False)
    diff = check_against_pytorch(lambda t: run(t).numpy(), model, resolution, "LiteRT")
    write_bytes(path, data)
    record_verified(data, "litert")  # loaded and run above
    return diff


def export_tflite_int8(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    path: str | Path,
    resolution: int = 224,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as a full-integer LiteRT model: PT2E with litert-torch's quantizer,
    activation ranges observed on ``calibration_batches`` (image tensors of
    ``resolution``); returns the max abs difference between the interpreter and the float
    model, checked (:func:`_check_int8`) before the file appears."""
    litert_torch = _require_converter()
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "litert", _PURPOSE)
    from litert_torch.quantize import pt2e_quantizer, quant_config

    model = model.eval()
    name = model_name(model)
    prepared = _delegable(prepare_for_inference(model, channels_last=False), int8=True)
    prepared = integer_activations(prepared)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True)
    )
    with _quiet_conversion():
        captured = _capture(prepared, resolution, name)
        observed = pt2e.prepare_pt2e(captured, quantizer)
        seen, first = observe(observed, calibration_batches)
        # Unfolded: the converter turns each quantize/dequantize pair into int8 tensors.
        reference = pt2e.convert_pt2e(observed, fold_quantize=False)
    config = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    flat = _convert(reference, resolution, name, config, litert_torch)
    meta = sealed_metadata(_metadata(model, resolution, metadata, "int8"))
    meta["calibration_images"] = str(seen)
    meta["batch"] = FIXED_BATCH  # see the module's docstring
    data = seal(_with_metadata(flat, meta))
    run, _ = read_tflite(data, "the exported int8 model", threads=1, verify=False)
    diff = _check_int8(run, model, reference, first)
    write_bytes(path, data)
    record_verified(data, "litert")  # loaded and run above
    return diff


def quantize_tflite(
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, float]:
    """Write an int8 LiteRT model of ``trained`` (a :class:`mobilenet.deployed.Trained`)
    to ``out``, calibrated on ``calibration_images`` images of ``data`` drawn at random
    (all it holds when that is fewer: ``progress`` is told); returns how many images were
    used and the model's max abs difference from the float model."""
    _require_converter()  # before the calibration data is read
    args = (trained, data, out, calibration_images, seed, progress)
    return calibrated_export(export_tflite_int8, *args)


def read_tflite(
    source: str | Path | bytes, name: str = "", threads: int | None = None, verify: bool = True
) -> tuple[Runner, dict[str, str]]:
    """A runner of a ``.tflite`` written by this module (float NCHW image batch in,
    float logits out, any batch size: image by image for a file of fixed batch 1) and its
    metadata; anything else, or a damaged file, is one error. ``threads`` is the
    interpreter's thread count (LiteRT's Python interpreter takes one when it is None).
    The runner is not thread-safe.

    The file's digest is checked first, then (``verify``) the interpreter reads it in a
    child process (:func:`mobilenet.native.verify_in_child`), once per file: LiteRT
    verifies the flatbuffer, but a file that passes can still crash its native code.
    ``verify=False`` is for bytes this process has just made."""
    interpreter_module = require("ai_edge_litert.interpreter", "litert", _RUN_PURPOSE)
    if threads is not None and threads < 1:
        raise MobileNetError(f"threads must be at least 1, not {threads}")
    what = name or ("the model" if isinstance(source, bytes) else str(source))
    data = read_bytes(source, what)
    if data[4:8] != b"TFL3":  # the flatbuffer's file identifier
        raise MobileNetError(f"{what}: not a .tflite file")
    sealed = check_seal(data, what, note=False)  # its note once the file has loaded
    if verify:
        verify_in_child(data, what, "litert")
    log = NativeLog()
    try:
        with quiet_native_stderr() as log:  # the delegate logs each creation
            # The interpreter verifies the flatbuffer before it reads anything from it.
            interpreter = interpreter_module.Interpreter(model_content=data, num_threads=threads)
            interpreter.allocate_tensors()
            # Tensor names are decoded here: a damaged one is a UnicodeDecodeError.
            inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    except Exception as e:  # ValueError, RuntimeError on a damaged file
        reason = first_line(e) + log.quote("LiteRT")
        raise MobileNetError(f"{what}: not a model LiteRT can load ({reason})") from None
    metadata = _read_metadata(data, what)
    if not sealed:  # a refused file gets one line, not two
        note_unsealed(what)
    resolution = ModelCard.read(metadata, what).resolution
    shapes = [[int(n) for n in d["shape"][1:]] for d in inputs]
    if len(outputs) != 1 or shapes != [[3, resolution, resolution]]:
        raise MobileNetError(f"{what}: its input is not one {LAYOUT} image batch")
    fixed = metadata.get("batch") == FIXED_BATCH
    return _runner(interpreter, inputs[0], outputs[0], what, fixed), metadata


def probe_tflite(data: bytes, what: str) -> None:
    """Load ``data`` and run it once (batch 1, zeros) on one thread: what the child
    process of :func:`mobilenet.native.verify_in_child` does with a ``.tflite``."""
    run, metadata = read_tflite(data, what, threads=1, verify=False)
    resolution = ModelCard.read(metadata, what).resolution
    run(torch.zeros(1, 3, resolution, resolution))


def _runner(interpreter: Any, image: dict, logits: dict, what: str, fixed: bool) -> Runner:
    shape = [int(n) for n in image["shape"][1:]]
    batch = [int(image["shape"][0])]

    def run(images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or list(images.shape[1:]) != shape or images.shape[0] < 1:
            raise MobileNetError(f"{what} takes batches of {'x'.join(map(str, shape))} images")
        if fixed and len(images) > 1:  # a batch the file cannot take: image by image
            return torch.cat([run(one) for one in images.split(1)])
        x = images.detach().to(torch.float32).contiguous().numpy()
        try:
            if len(x) != batch[0]:  # the interpreter plans its memory again
                interpreter.resize_tensor_input(image["index"], [len(x), *shape])
                interpreter.allocate_tensors()
                batch[0] = len(x)
            interpreter.set_tensor(image["index"], _quantize(x, image))
            interpreter.invoke()
        except (RuntimeError, ValueError) as e:
            raise MobileNetError(f"{what}: LiteRT cannot run it ({first_line(e)})") from None
        return torch.from_numpy(_dequantize(interpreter.get_tensor(logits["index"]), logits))

    return run


def _batch_resizable(flat: bytes, resolution: int) -> bool:
    """Whether the interpreter plans a batch of 2 for the converted model: not where the
    converter has fixed a RESHAPE's batch at 1 (MobileNetV5's attention)."""
    interpreter_module = require("ai_edge_litert.interpreter", "litert", _PURPOSE)
    with quiet_native_stderr():
        interpreter = interpreter_module.Interpreter(model_content=flat, num_threads=1)
        index = interpreter.get_input_details()[0]["index"]
        try:
            interpreter.resize_tensor_input(index, [2, 3, resolution, resolution])
            interpreter.allocate_tensors()  # where the delegate plans every shape
        except (RuntimeError, ValueError):
            return False
    return True


def tflite_batch(metadata: dict[str, str]) -> str:
    """A file's batch sizes in words, from its metadata (for ``export``'s line)."""
    if metadata.get("batch") == FIXED_BATCH:
        return "batch 1 (larger batches image by image)"
    return "batch 1, resizable"


def tflite_metadata(data: bytes, what: str) -> dict[str, str]:
    """The metadata of a ``.tflite`` written by this module, from its bytes (which the
    interpreter has verified, or this process has just made)."""
    return _read_metadata(data, what)


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] != np.int8:
        return x
    scale, zero = detail["quantization"]
    return np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if detail["dtype"] != np.int8:
        return y
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _require_converter() -> Any:
    """Import litert-torch, or name the extra. Its first import logs native lines (oneDNN,
    absl) and a deprecation warning of torchao's that say nothing to a user."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        with quiet_native_stderr():
            require("ai_edge_litert.interpreter", "litert", _PURPOSE)
            return require("litert_torch", "litert", _PURPOSE)
    finally:
        pytree.setLevel(level)


def _metadata(
    model: nn.Module, resolution: int, extra: dict[str, str] | None, dtype: str
) -> dict[str, str]:
    meta = {**model_metadata(model, resolution), **(extra or {})}
    return {**meta, "dtype": dtype, "layout": LAYOUT, "format": FORMAT}


def _with_metadata(flat: bytes, meta: dict[str, str]) -> bytes:
    """The flatbuffer ``flat`` with ``meta`` as JSON in the metadata entry
    :data:`META_NAME`."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(flat))
    for entry in model.metadata or []:
        if entry.name == META_NAME.encode() and entry.buffer < len(model.buffers):
            model.buffers[entry.buffer].data = None  # the old JSON, its digest with it
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = META_NAME, len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != META_NAME.encode()]
    model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _read_metadata(data: bytes, what: str) -> dict[str, str]:
    """Our metadata entry of a flatbuffer the interpreter has verified."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    text = None
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == META_NAME.encode() and entry.Buffer() < model.BuffersLength():
            raw = model.Buffers(entry.Buffer()).DataAsNumpy()
            text = bytes(raw) if isinstance(raw, np.ndarray) else b""
    if text is None:
        raise MobileNetError(f"{what}: not a .tflite file written by mobilenet export")
    try:
        metadata = json.loads(text)
    except ValueError:
        metadata = None
    valid = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    if not valid or metadata.get("format") != FORMAT:
        raise MobileNetError(f"{what}: its mobilenet metadata is damaged")
    square = ModelCard.read(metadata, what).resolution  # the card's own checks, in one line
    if square is None or metadata.get("layout") != LAYOUT:
        raise MobileNetError(f"{what}: its mobilenet metadata is damaged")
    return metadata


def _delegable(prepared: nn.Module, int8: bool = False) -> nn.Module:
    """Attention as matrix products, which litert-torch converts right (its fused
    attention of one key/value head for many query heads it does not), and for ``int8``
    TensorFlow's SAME padding as concatenated zeros; RMS norms and GELUs as they are (see
    :func:`mobilenet.export.prepare.delegable_forms`)."""
    return delegable_forms(prepared, norms=False, gelus=False, pads=int8)


def _capture(module: nn.Module, resolution: int, name: str) -> torch.fx.GraphModule:
    """``module`` through ``torch.export`` with a dynamic batch, for calibration batches of
    any size."""
    example = torch.randn(2, 3, resolution, resolution)  # batch 1 would be specialised
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise MobileNetError(f"torch.export cannot export {name}: {first_line(e)}") from None
    return program.module()


def _convert(
    module: nn.Module, resolution: int, name: str, config: Any = None, litert_torch: Any = None
) -> bytes:
    """``module`` converted by litert-torch at batch 1, as flatbuffer bytes."""
    litert_torch = litert_torch or _require_converter()
    example = (torch.randn(1, 3, resolution, resolution),)
    try:
        with _quiet_conversion():
            return bytes(litert_torch.convert(module, example, quant_config=config).model_content())
    except Exception as e:  # the converter raises many types for a graph it cannot lower
        raise MobileNetError(f"litert-torch cannot convert {name}: {first_line(e)}") from None


def _check_int8(run: Runner, model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """The int8 file checked against the quantized PyTorch reference it was lowered
    from, on calibration images, by :func:`mobilenet.export.int8_check.check_int8`: refused
    when it is further from the reference than ``INT8_SLACK`` times this network's own
    rounding noise, or picks a class the reference does not come close to; returns its max
    abs difference from the float model."""
    return check_int8(run, model, reference, images, "LiteRT", INT8_SLACK)


@contextlib.contextmanager
def _quiet_conversion() -> Iterator[None]:
    """Keep the converter's progress lines (printed unless LITERT_TORCH_SHOW_PROGRESS is
    off), its logged warnings, torch.export's and the native ones off the terminal: a
    refusal is one line."""
    saved_env = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    root = logging.getLogger()
    level = root.level
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_torch_export_logs(), quiet_native_stderr():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        if saved_env is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = saved_env
