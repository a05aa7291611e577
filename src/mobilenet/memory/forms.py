"""Which executor layer computes which module: one table, :data:`EXECUTOR_FORMS`.

Each block type of a backbone, and each segmentation head, maps to the builder of its
*executor form*: a module that computes the same function as V2 Section 5.1 describes,
with a ``plan`` that replays its allocations. Adding a block is a row here and a class
(:mod:`~mobilenet.memory.ops` holds V2/V3's, :mod:`~mobilenet.memory.v4` V4's); a module
without a row is refused by name.

The stem is not in the table: a network's first layer is always the
:class:`~mobilenet.memory.ops.Stem`, which reads the (C, H, W) image, while a conv later
on (V4's Conv-S stages) is a :class:`~mobilenet.memory.v4.FullConv`.

The segmentation heads register their forms (:func:`~mobilenet.memory.heads.register_head_forms`,
through :func:`register_form`) when a segmentation model's executor is first built: they
are classes of :mod:`mobilenet.segmentation`, which ``import mobilenet`` leaves unloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..blocks import (
    FusedInvertedBottleneck,
    InvertedResidual,
    MobileMQA,
    UniversalInvertedBottleneck,
)
from ..errors import MobileNetError
from ..layers import ConvBNAct, RmsNorm2d
from .ops import GroupedInvertedResidual
from .v4 import FullConv, GroupedUIB, WholeMQA

__all__ = [
    "EXECUTOR_FORMS",
    "Builder",
    "FormOptions",
    "check_supported",
    "executor_form",
    "register_form",
]


@dataclass(frozen=True)
class FormOptions:
    """What a builder may need beside the folded module itself."""

    splits: int = 1  # V2 Section 5.1's t: the channel groups of each expansion
    band_rows: int | None = None  # the height of the bands an upsampling is computed in
    # A segmentation head's: the backbone's last layer when it is a 1x1 conv (the head
    # reads it in channel groups), and the channels of the last block's output.
    last: nn.Module | None = None
    in_channels: int = 0


Builder = Callable[[Any, FormOptions], nn.Module]

EXECUTOR_FORMS: dict[type[nn.Module], Builder] = {
    InvertedResidual: lambda block, o: GroupedInvertedResidual(block, o.splits),  # V2, V3
    ConvBNAct: lambda layer, o: FullConv(layer, o.splits),  # V4's convs after the stem
    FusedInvertedBottleneck: lambda block, o: FullConv(block, o.splits),  # V4
    UniversalInvertedBottleneck: lambda block, o: GroupedUIB(block, o.splits),  # V4
    MobileMQA: lambda block, o: WholeMQA(block),  # V4's hybrid models
}


def register_form(module_type: type[nn.Module], builder: Builder) -> None:
    """Make ``builder`` the executor form of ``module_type`` (and of its subclasses
    without a form of their own)."""
    EXECUTOR_FORMS[module_type] = builder


def executor_form(module: nn.Module, options: FormOptions, where: str) -> nn.Module:
    """The executor form of a folded ``module``, from the table entry of its class or of
    the nearest base class that has one; a module without one is refused, naming its
    type and ``where`` it is (the model)."""
    for cls in type(module).__mro__:
        builder = EXECUTOR_FORMS.get(cls)
        if builder is not None:
            return builder(module, options)
    raise MobileNetError(
        f"the memory-efficient executor has no form of {type(module).__name__} (in {where})"
    )


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse, in one line naming the first such layer, what no executor form computes:
    a layer normalised over all its channels at once (MobileNetV5's RMS norm: an
    expansion computed in channel groups would need every group's sum of squares before
    its first activation), and a downsampling after the convolution (timm's anti-aliased
    V4s compute a strided conv at stride 1, then pool)."""
    for where, module in model.named_modules():
        if isinstance(module, RmsNorm2d):
            raise MobileNetError(
                f"{name}: the memory-efficient executor cannot split {where} (an RMS norm "
                "normalises each pixel over all its channels, so its layer cannot be "
                "computed in channel groups)"
            )
        if isinstance(module, ConvBNAct) and getattr(module, "aa", None) is not None:
            raise MobileNetError(
                f"{name}: the memory-efficient executor has no form of the anti-aliased "
                f"downsampling of {where} (a stride-1 conv followed by a pool)"
            )
