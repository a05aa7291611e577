"""The check every float exporter runs before a file appears: the exported model's outputs
against the PyTorch model's, on random batches.

ONNX Runtime, TorchScript, ``torch.export``, ExecuTorch and LiteRT are each compared by
:func:`check_against_pytorch`, with one tolerance, so a format that computes something
else is refused in one line and writes nothing. (int8 files are judged otherwise, by
:mod:`mobilenet.export.int8_check`.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import MobileNetError
from .metadata import input_size

__all__ = ["TOLERANCE", "check_against_pytorch", "class_scores"]

TOLERANCE = 1e-4  # max abs difference, for logits of unit scale (see check_against_pytorch)


def class_scores(model: nn.Module) -> bool:
    """Whether ``model``'s output channels are class scores (a classifier's logits; a
    segmentation model's, pixel by pixel): every model's but one without classes
    (``num_classes`` 0: an encoder, whose output is features)."""
    return getattr(model, "num_classes", None) != 0


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits: a classifier's output, a segmentation model's ``"out"``."""
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def check_against_pytorch(
    run: Callable[[torch.Tensor], np.ndarray],
    model: nn.Module,
    resolution: int | Sequence[int],
    what: str,
) -> float:
    """Max abs difference between ``run`` (the exported model, called ``what`` in the
    message) and the PyTorch model on random batches of 1 and 3, at a side or
    ``(height, width)``; a segmentation model is compared on its ``"out"``, an encoder
    on its feature map.

    The tolerance is 1e-4 for logits up to 1 in magnitude and scales with larger ones:
    float32 kernels that sum in another order differ by a relative ~1e-6 per layer, so
    logits of 20 may differ by more than 1e-4 without anything being wrong. An encoder's
    features (a model without classes, :func:`class_scores`) are held to 1e-4 of their
    own largest magnitude, however small: their scale is its last norm's weights, and a
    floor of 1 would let a map of scale 0.05 be 0.2% off (an exact GELU for a tanh one,
    say: MobileNetV5-300M's output then moves by 1e-3 of its scale).
    """
    g = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 1.0 if class_scores(model) else 0.0
    for batch in (1, 3):
        x = torch.randn(batch, 3, *input_size(resolution), generator=g)
        with torch.no_grad():
            expected = _logits(model, x).numpy()
        if not np.isfinite(expected).all():  # else "differs by nan", which says nothing
            raise MobileNetError(
                "the model outputs NaN or infinite values (damaged or overflowing weights); "
                "nothing written"
            )
        worst = max(worst, float(np.abs(run(x) - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    if not worst <= TOLERANCE * scale:
        raise MobileNetError(
            f"{what} differs from PyTorch by {worst:.2e} (tolerance {TOLERANCE * scale:.1e}); "
            "nothing written"
        )
    return worst
