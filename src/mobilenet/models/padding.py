"""A model's padding option: PyTorch's symmetric padding or TensorFlow's SAME.

The papers' authors trained in TensorFlow, whose SAME padding of a stride-2 conv depends
on the input's size (see :mod:`mobilenet.layers`); torchvision and timm pad symmetrically.
Weights trained one way give different outputs the other way (up to several logits), so a
model carries its padding in its config, saved with its weights, and a checkpoint that
needs the other one sets it or is refused (:meth:`MobileNet.check_settings`).
"""

from __future__ import annotations

from ..errors import MobileNetError
from .base import EvalConfig

__all__ = ["KERAS_EVAL", "MODEL_PADDINGS", "TF_PREPROCESS", "resolve_padding"]

MODEL_PADDINGS = ("symmetric", "same")

# Keras applications' inputs: pixels scaled to [-1, 1] (mean 0.5, std 0.5 on [0, 1]); V3's
# built-in Rescaling layer does the same to [0, 255] pixels, so ours takes [-1, 1] inputs.
TF_PREPROCESS = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # the TF checkpoints' too
KERAS_EVAL = EvalConfig(**TF_PREPROCESS)


def resolve_padding(padding: str | None, keras: bool = False) -> str:
    """A builder's ``padding``: None is "symmetric", or "same" for Keras' build (which
    pads as TensorFlow's SAME and nothing else)."""
    if padding is None:
        return "same" if keras else "symmetric"
    if padding not in MODEL_PADDINGS:
        raise MobileNetError(f"padding must be 'symmetric' or 'same', got {padding!r}")
    if keras and padding != "same":
        raise MobileNetError("Keras' build (keras=True) pads as TensorFlow's SAME: padding='same'")
    return padding
