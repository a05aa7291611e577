"""Export to ONNX (checked against ONNX Runtime) and TorchScript.

Both formats are serialised into memory, checked there, and only then written, by Python,
through :func:`~mobilenet.fileio.write_bytes`: a failed check writes nothing, and a full
disk is one error line instead of an abort inside a C++ writer (``torch.jit.save``).

An ONNX file is sealed with the digest of its bytes (:mod:`mobilenet.integrity`) wherever
its metadata is written (:func:`with_metadata`), and :func:`onnx_session` checks it: a
flipped byte in the weights would otherwise load and change the scores. ONNX Runtime
refuses a damaged graph with an exception (none of 350 one-byte changes of a small
file's graph crashed it), so it needs no child process.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import MobileNetError
from ..extras import require
from ..fileio import read_bytes, write_bytes
from ..integrity import MARKER, check_seal, seal, sealed_metadata
from .check import check_against_pytorch
from .metadata import input_size, model_metadata
from .prepare import prepare_for_inference

__all__ = [
    "DEFAULT_OPSET",
    "export_onnx",
    "export_torchscript",
    "input_size",
    "onnx_session",
    "supported_opsets",
]

DEFAULT_OPSET = 17  # HardSwish (14+) and HardSigmoid are standard ops at this opset
MIN_OPSET = 7  # the oldest opset ONNX Runtime runs
# The newest opset torch.onnx's TorchScript-based exporter (dynamo=False, used here)
# writes: 20 from torch 2.3 on. torch keeps it in a private module, so it is named here.
TORCHSCRIPT_MAX_OPSET = 20


def onnx_session(
    path: str | Path | bytes, threads: int | None = None, name: str = "", qdq_in_float: bool = False
):
    """An ONNX Runtime CPU session of a file or of a serialised model (``bytes``, called
    ``name`` in messages); a corrupt one gives a clear error. A file's digest is checked
    before ONNX Runtime reads it (a file with none loads, with a note). ``qdq_in_float``:
    an int8 QDQ graph is run as written, each quantize/dequantize pair in float32 (ONNX
    Runtime's ``session.disable_quant_qdq``), not fused into int8 kernels: the quantized
    model's arithmetic by definition, on every CPU."""
    ort = require("onnxruntime", "deploy", "running an ONNX model")

    what = name or ("the exported model" if isinstance(path, bytes) else str(path))
    if isinstance(path, bytes):  # a model made in this process, not a file
        data, sealed = path, True
    else:
        data = read_bytes(path, what)
        sealed = MARKER.encode() in data
        if sealed:
            check_seal(data, what)
    options = ort.SessionOptions()
    if qdq_in_float:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        # It prints an "EP Error" banner to stdout before it retries and raises.
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MobileNetError(f"{what}: not a model ONNX Runtime can load ({first})") from None
    if not sealed:
        check_seal(data, what)  # its note, for a file that loads: a refusal says enough
    return session


class _MainOutput(nn.Module):
    """A segmentation model's ``"out"`` logits as its only output: the dict of its forward
    is not a graph output ONNX can carry, and ``"aux"`` serves training only."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[self.key]


def supported_opsets() -> range:
    """The ONNX opsets this export writes: from the oldest ONNX Runtime runs to the newest
    both the exporter and the installed ``onnx`` know."""
    high = TORCHSCRIPT_MAX_OPSET
    try:
        import onnx.defs

        high = min(high, onnx.defs.onnx_opset_version())
    except ImportError:  # export then names the missing extra itself
        pass
    return range(MIN_OPSET, high + 1)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    resolution: int | Sequence[int] = 224,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as ONNX with a dynamic batch dimension, for inputs of ``resolution``
    (a side, or ``(height, width)``); returns the max abs difference between ONNX Runtime
    and PyTorch, checked before the file appears.

    A classifier's output is its logits; a segmentation model's is the ``"out"`` entry of
    its dict, ``[N, classes, H, W]`` logits at the input size (the graph's upsampling
    targets the exported size). The file's metadata holds the model config, the task, the
    input size (``resolution``: ``224``, or ``1024x2048`` when not square), the evaluation
    preprocessing (``model.preprocess``, when the model has one) and any ``metadata``
    given (e.g. class names), so ``mobilenet eval`` can use it alone.
    """
    for module in ("onnx", "onnxruntime"):  # before any work
        require(module, "deploy", "ONNX export")
    path = Path(path)
    model = model.eval()
    prepared = prepare_for_inference(model, channels_last=False)
    key = getattr(model, "main_output", None)
    if key is not None:  # a segmentation model's dict of maps: the main one
        prepared = _MainOutput(prepared, key)
    x = torch.randn(1, 3, *input_size(resolution))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            prepared,
            (x,),
            buffer,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    meta = {**model_metadata(model, resolution), **(metadata or {})}
    data = with_metadata(buffer.getvalue(), meta)
    session = onnx_session(data)
    diff = check_against_pytorch(
        lambda t: session.run(None, {"images": t.numpy()})[0], model, resolution, "ONNX Runtime"
    )
    write_bytes(path, data)
    return diff


def set_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Store string key/values in an ONNX file's ``metadata_props`` (sealed again)."""
    path = Path(path)
    write_bytes(path, with_metadata(read_bytes(path, str(path)), metadata))


def with_metadata(model: bytes, metadata: dict[str, str]) -> bytes:
    """A serialised ONNX model with ``metadata`` (string key/values) as its
    ``metadata_props``, in place of any it had, sealed with the digest of the result
    (:mod:`mobilenet.integrity`; a ``digest`` in ``metadata`` is replaced)."""
    onnx = require("onnx", "deploy", "writing ONNX metadata")

    proto = onnx.load_model_from_string(model)
    del proto.metadata_props[:]
    for key, value in sealed_metadata(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return seal(proto.SerializeToString())


def read_metadata(session) -> dict[str, str]:
    return dict(session.get_modelmeta().custom_metadata_map)


def export_torchscript(model: nn.Module, path: str | Path, resolution: int = 224) -> float:
    """Write a traced TorchScript module (BatchNorm folded); returns the checked difference."""
    path = Path(path)
    model = model.eval()
    prepared = prepare_for_inference(model, channels_last=False)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(prepared, torch.randn(1, 3, resolution, resolution))
        torch.jit.save(traced, buffer)
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    diff = check_against_pytorch(
        lambda t: loaded(t).detach().numpy(), model, resolution, "TorchScript"
    )
    write_bytes(path, buffer.getvalue())
    return diff
