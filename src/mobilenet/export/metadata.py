"""What every exported file says about its model, whatever the format.

ONNX keeps it in ``metadata_props``, a ``.pt2`` in ``extra/mobilenet.json``, a ``.pte`` in
a method of its program, a ``.tflite`` in its flatbuffer's metadata table: the same flat
string map in each, the model's card (:mod:`mobilenet.card`), so ``eval`` and ``predict``
read any of them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..card import ModelCard

__all__ = ["input_size", "model_metadata", "model_name"]


def input_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a square's side or of a pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


def model_name(model: nn.Module) -> str:
    """The registered name of ``model`` (its config's), for messages; its class name
    when it has no config."""
    return getattr(getattr(model, "config", None), "name", type(model).__name__)


def model_metadata(model: nn.Module, resolution: int | Sequence[int]) -> dict[str, str]:
    """The card of ``model`` as an exported file's key/values: its task, its config and
    its input size, and the evaluation preprocessing at that size where it has one. The
    caller's own card (class names, quantization) is laid over it."""
    config = getattr(model, "config", None)
    preprocess = getattr(model, "preprocess", None)  # a classifier loaded from a checkpoint
    card = ModelCard(
        config=None if config is None else config.to_dict(),
        task=getattr(model, "task", "classification"),
        input_size=input_size(resolution),
        preprocess=None if callable(preprocess) else preprocess,  # (a detector's: a method)
    )
    return card.metadata()
