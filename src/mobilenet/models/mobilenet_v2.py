"""MobileNetV2 (Sandler et al., CVPR 2018, arXiv 1801.04381).

ImageNet results (V2 Table 4): MobileNetV2 1.0-224: 72.0% top-1, 3.4M params, 300M MAdds;
MobileNetV2 1.4-224: 74.7% top-1, 6.9M params, 585M MAdds (the released 1.4 model counts
6.06M params and 582M MAdds with ``make_divisible`` rounding).

Width multiplier: every channel count ``c`` becomes ``make_divisible(c * alpha)``, except
the last 1280-channel conv, which is never thinned (it is widened for alpha > 1).

Output stride 16 or 8 (V2 Section 6.3, DeepLab's convention, as timm's ``output_stride``):
the 160-channel stage (and at 8 the 64-channel stage too) keeps stride 1 and the
depthwise convs after its first block are dilated by 2 (then 4); see
:mod:`mobilenet.models.atrous`.

``padding="same"``: TF's SAME padding, as the authors' checkpoints were trained with.
``drop_path_rate``: stochastic depth on the residual blocks' branches, growing linearly
with depth towards ``drop_path_rate`` as the authors' code schedules it
(:func:`~mobilenet.models.base.layer_drop_path`); 0, the default, adds no module.

``keras=True`` builds Keras' ``MobileNetV2`` (whose weights :mod:`.keras_layouts` reads):
SAME padding, and block widths ``make_divisible(int(c * alpha))`` (the same as ours at
every alpha Keras publishes: 0.35, 0.5, 0.75, 1.0, 1.3, 1.4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from torch import nn

from ..blocks import InvertedResidual
from ..layers import ConvBNAct, make_divisible
from .atrous import atrous_layout
from .base import MobileNet, ModelConfig, check_drop_path_rate, layer_drop_path
from .padding import KERAS_EVAL, resolve_padding
from .registry import register_model

__all__ = ["V2_TABLE_2", "mobilenet_v2"]


class Bottleneck(NamedTuple):
    """One row of V2 Table 2: expansion t, output channels c, repeats n, first stride s."""

    t: int
    c: int
    n: int
    s: int


STEM_CHANNELS = 32  # Table 2, row 1: conv2d 3x3, 32, stride 2
LAST_CHANNELS = 1280  # Table 2: conv2d 1x1, 1280

# V2 Table 2: the bottleneck rows, 224x224x3 input.
V2_TABLE_2 = (
    #          t    c  n  s
    Bottleneck(1, 16, 1, 1),  # 112x112x32 -> 112x112x16
    Bottleneck(6, 24, 2, 2),  # -> 56x56x24
    Bottleneck(6, 32, 3, 2),  # -> 28x28x32
    Bottleneck(6, 64, 4, 2),  # -> 14x14x64
    Bottleneck(6, 96, 3, 1),  # -> 14x14x96
    Bottleneck(6, 160, 3, 2),  # -> 7x7x160
    Bottleneck(6, 320, 1, 1),  # -> 7x7x320
)


@register_model
def mobilenet_v2(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV2 (V2 Table 2): 3,504,872 params and 300.8M MAdds at 1.0-224."""
    padding = resolve_padding(padding, keras)
    drop_path_rate = check_drop_path_rate(drop_path_rate)
    rows = [(row, row.s if i == 0 else 1) for row in V2_TABLE_2 for i in range(row.n)]
    # the authors' block spec list: the stem, the bottlenecks, the last 1x1 conv
    num_layers = len(rows) + 2
    # (stride, dilation) of the stem and of each block
    layout = atrous_layout([2] + [stride for _, stride in rows], output_stride)
    in_channels = make_divisible(STEM_CHANNELS * width_mult)
    layers: list[nn.Module] = [ConvBNAct(3, in_channels, 3, stride=2, padding=padding)]
    for (row, _), (stride, dilation) in zip(rows, layout[1:], strict=True):
        # Keras truncates c * alpha before rounding it
        out = make_divisible(int(row.c * width_mult) if keras else row.c * width_mult)
        exp = in_channels * row.t
        drop_path = layer_drop_path(drop_path_rate, len(layers), num_layers)
        options = {"dilation": dilation, "padding": padding, "drop_path": drop_path}
        layers.append(InvertedResidual(in_channels, exp, out, 3, stride, **options))
        in_channels = out
    last = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
    layers.append(ConvBNAct(in_channels, last, 1))
    config = ModelConfig(
        "mobilenet_v2", width_mult, num_classes, dropout, output_stride=output_stride
    )
    config = replace(config, padding=padding, keras=keras)
    return MobileNet(layers, config, eval_config=KERAS_EVAL if keras else None)
