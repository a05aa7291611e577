"""ONNX export of a detector: the network's raw outputs and its default boxes.

The ONNX graph takes ``images``: float ``[N, 3, S, S]`` in [0, 1], already resized to
the model's input size ``S`` (normalisation is inside), and returns

* ``logits`` ``[N, A, C]``: class scores; class 0 is the background;
* ``box_codes`` ``[N, A, 4]``: offsets from the default boxes;
* ``default_boxes`` ``[A, 4]``: the default boxes (x1, y1, x2, y2, pixels of the input).

Decoding (what :meth:`SSDLite.postprocess` does), with ``(w_d, h_d, cx_d, cy_d)`` a
default box's size and centre and weights (10, 10, 5, 5)::

    cx = dx / 10 * w_d + cx_d      w = exp(dw / 5) * w_d
    cy = dy / 10 * h_d + cy_d      h = exp(dh / 5) * h_d
    box = (cx - w/2, cy - h/2, cx + w/2, cy + h/2), clipped to [0, S]
    scores = softmax(logits)[:, 1:]  -> per class: score threshold, top-k, NMS

then scale boxes by (image width / S, image height / S). The file's metadata holds the
config (thresholds included), ``box_coder_weights`` and ``categories``.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..card import ModelCard
from ..errors import MobileNetError
from ..export.onnx import DEFAULT_OPSET, onnx_session, with_metadata
from ..export.prepare import prepare_for_inference
from ..fileio import write_bytes
from .model import SSDLite

__all__ = ["export_detector_onnx"]

TOLERANCE = 1e-4  # relative to the outputs' scale


class _RawDetector(nn.Module):
    def __init__(self, model: SSDLite) -> None:
        super().__init__()
        self.model = model
        cfg = model.config
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        self.register_buffer("default_boxes", model.anchors().clone())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, codes = self.model.forward_raw((images - self.mean) / self.std)
        return logits, codes, self.default_boxes


def export_detector_onnx(
    model: SSDLite,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> float:
    """Write ``model`` as ONNX (dynamic batch); returns the max abs difference between
    ONNX Runtime and PyTorch, checked before the file appears."""
    path = Path(path)
    raw = _RawDetector(prepare_for_inference(model.eval(), channels_last=False)).eval()
    reference = _RawDetector(model.eval()).eval()
    size = model.config.image_size
    # Exported and checked in memory, then written in one piece: a library writing
    # straight to disk can fail silently or abort on a full disk.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            raw,
            (torch.rand(1, 3, size, size),),
            buffer,
            input_names=["images"],
            output_names=["logits", "box_codes", "default_boxes"],
            dynamic_axes={
                "images": {0: "batch"},
                "logits": {0: "batch"},
                "box_codes": {0: "batch"},
            },
            opset_version=opset,
            dynamo=False,
        )
    card = ModelCard.read(metadata or {}, "the detector's card").replace(
        config=model.config.to_dict(), task="detection", input_size=size
    )
    meta = {
        **card.metadata(),
        "box_coder_weights": json.dumps(list(model.box_coder.weights)),
    }
    data = with_metadata(buffer.getvalue(), meta)
    worst, scale = _worst_difference(reference, onnx_session(data), size)
    if not worst <= TOLERANCE * scale:
        raise MobileNetError(
            f"ONNX Runtime differs from PyTorch by {worst:.2e} "
            f"(tolerance {TOLERANCE * scale:.1e}); nothing written"
        )
    write_bytes(path, data)
    return worst


def _worst_difference(reference: nn.Module, session, size: int) -> tuple[float, float]:
    """(largest |ONNX Runtime - PyTorch| over batches of 1 and 2, largest |PyTorch| or 1)."""
    g = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 1.0
    for batch in (1, 2):
        x = torch.rand(batch, 3, size, size, generator=g)
        with torch.no_grad():
            expected = [t.numpy() for t in reference(x)]
        got = session.run(None, {"images": x.numpy()})
        for e, o in zip(expected, got, strict=True):
            worst = max(worst, float(np.abs(e - o).max()))
            scale = max(scale, float(np.abs(e).max()))
    return worst, scale
