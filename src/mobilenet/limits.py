"""Sizes that cannot fit, refused in one line before anything is allocated.

Two kinds of limit:

* bounds on the numbers themselves: :data:`MAX_WIDTH_MULT` and :data:`MAX_RESOLUTION`,
  beyond which a model is absurd (channel counts in the hundreds of thousands) or its
  shapes no longer fit PyTorch's 64-bit sizes. :func:`mobilenet.cost` answers for anything
  within them, as it works on shapes alone.
* :func:`check_memory`, for the commands that must allocate (``bench``, ``memory``,
  ``export``, ``train``, ``eval``, ``predict``): an estimate of what the model will hold,
  from its shapes on the ``meta`` device, against the memory the machine has available.
  Without it a huge ``--resolution`` or ``--batch`` ends in the kernel's out-of-memory
  killer or an allocator traceback, after minutes of swapping.

The estimate is the weights still to be allocated plus the cost model's activation memory
times the batch: the peak of a plain forward pass for inference, every activation for
training (a training step keeps them for its backward pass) together with the gradients
and two optimizer moments. Kernel workspaces and the interpreter are not counted, so it is
a lower bound: a refusal is certain, an acceptance a good sign.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .cost import MAX_RESOLUTION, activation_memory
from .errors import MobileNetError
from .machine import available_memory, format_bytes
from .models.registry import MAX_WIDTH_MULT

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "MAX_RESOLUTION",
    "MAX_WIDTH_MULT",
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "estimate_memory",
    "format_bytes",
    "meta_model",
]


# Gradients plus two optimizer moments (AdamW, RMSprop; SGD's momentum is one): what a
# training step adds to every trainable parameter.
_TRAINING_COPIES = 3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run will allocate: weights not yet in memory, and activations."""

    weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.activations


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model on the ``meta`` device: shapes without data, instantly, at
    any width. The argument checks of :func:`mobilenet.create_model` all apply."""
    import torch

    from .models import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


def estimate_memory(
    model: nn.Module,
    resolution: int | tuple[int, int],
    batch: int = 1,
    *,
    training: bool = False,
    copies: int = 1,
) -> MemoryEstimate:
    """What running ``model`` on ``batch`` images of ``resolution`` (a side, or
    ``(height, width)``) will allocate.

    Weights already in memory (not on the ``meta`` device) are not counted again: the
    machine's available memory already excludes them. ``copies`` counts processes that
    each hold the whole model (``bench`` runs one per engine).
    """
    from .models.base import DeployedModel

    weights = 0
    if isinstance(model, DeployedModel):  # ONNX Runtime, int8: loaded, not traceable
        config = model.config
        model = meta_model(
            config.name, width_mult=config.width_mult, num_classes=config.num_classes
        )
    else:
        tensors = itertools.chain(model.parameters(), model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors if t.is_meta)
    if training:
        trainable = (p for p in model.parameters() if p.requires_grad)
        weights += _TRAINING_COPIES * sum(p.numel() * p.element_size() for p in trainable)
    act = activation_memory(model, resolution)
    activations = batch * (act.total if training else act.peak)
    return MemoryEstimate(copies * weights, copies * activations)


def check_memory(
    model: nn.Module,
    resolution: int | tuple[int, int],
    batch: int = 1,
    what: str = "this run",
    *,
    training: bool = False,
    copies: int = 1,
    device: str | torch.device | None = None,
) -> MemoryEstimate:
    """Refuse, in one line, a run that cannot fit in the memory available on ``device``.

    ``model`` is best built with :func:`meta_model` (nothing allocated yet); a model
    already in memory is checked for its activations. ``what`` names the run in the
    message (``"the export"``). Returns the estimate when it fits.
    """
    estimate = estimate_memory(model, resolution, batch, training=training, copies=copies)
    available = available_memory(device)
    if available is not None and estimate.total > available:
        config = getattr(model, "config", None)
        name = config.name if config is not None else type(model).__name__
        width = getattr(config, "width_mult", None)
        width_text = f", width {width:g}" if isinstance(width, float) else ""
        processes = f" in {copies} processes" if copies > 1 else ""
        raise MobileNetError(
            f"{what} would need about {format_bytes(estimate.total)} of memory{processes} "
            f"({name}{width_text}, {_size_text(resolution)}, batch {batch}: weights "
            f"{format_bytes(estimate.weights)}, activations "
            f"{format_bytes(estimate.activations)}), more than the "
            f"{format_bytes(available)} available; use a smaller resolution, batch or width"
        )
    return estimate


def _size_text(resolution: int | tuple[int, int]) -> str:
    """``224x224`` for a side, ``1024x2048`` for a pair."""
    h, w = resolution if isinstance(resolution, tuple | list) else (resolution, resolution)
    return f"{h}x{w}"
