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

Depth multiplier (timm's ``mobilenetv2_110d``, ``mobilenetv2_120d``: width 1.1 and 1.2,
depth 1.2 and 1.4; not in the paper): every row's repeats ``n`` become ``ceil(n * depth)``
(:func:`scale_depth`, the rule of timm's ``_scale_stage_depth`` with ``depth_trunc='ceil'``,
as EfficientNet scales depth), except the first and the last bottleneck rows, which keep
one block, and the stem (32) and last conv (1280), which keep their widths
(``fix_stem_head``). At 1.1 / 1.2 the five middle rows repeat 3, 4, 5, 4, 4 times; at
1.2 / 1.4, 3, 5, 6, 5, 5 times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

from torch import nn

from ..blocks import InvertedResidual
from ..layers import ConvBNAct, make_divisible
from .atrous import atrous_layout
from .base import EvalConfig, MobileNet, ModelConfig, check_drop_path_rate, layer_drop_path
from .padding import KERAS_EVAL, resolve_padding
from .registry import register_model

__all__ = ["V2_TABLE_2", "build_v2", "deepen", "mobilenet_v2", "scale_depth"]


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


# timm's evaluation of its depth-scaled checkpoints (``mobilenetv2_110d.ra_in1k`` ...)
TIMM_DEPTH_EVAL = EvalConfig(resolution=224, crop_pct=0.875, interpolation="bicubic")


def scale_depth(repeats: Sequence[int], depth_mult: float) -> list[int]:
    """A stage's repeats scaled by ``depth_mult``, as timm's ``_scale_stage_depth`` (with
    ``depth_trunc='ceil'``, EfficientNet's rule) computes them: the stage's total becomes
    ``ceil(total * depth_mult)``, then is shared out to its block kinds (``repeats``, one
    count per kind) in proportion, from the last kind to the first, each at least 1,
    rounded as Python's ``round`` rounds (half to even). A stage of one kind just gets
    ``ceil(n * depth_mult)``; the first kinds, whose first block downsamples, are the
    least likely to grow."""
    total = sum(repeats)
    scaled = math.ceil(total * depth_mult)
    out: list[int] = []
    for r in reversed(repeats):
        share = max(1, round(r / total * scaled))
        out.append(share)
        total -= r
        scaled -= share
    return out[::-1]


def deepen(
    table: Sequence[Bottleneck], depth_mult: float, fix_first_last: bool = False
) -> tuple[Bottleneck, ...]:
    """The table with every row repeated ``scale_depth([n], depth_mult)`` times (each row is
    one of timm's stages); ``fix_first_last``: the first and the last rows as they are."""
    fixed = {0, len(table) - 1} if fix_first_last else set()
    return tuple(
        row if j in fixed else row._replace(n=scale_depth([row.n], depth_mult)[0])
        for j, row in enumerate(table)
    )


def build_v2(
    name: str,
    width_mult: float,
    num_classes: int,
    dropout: float,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
    depth_mult: float = 1.0,
    fix_stem_head: bool = False,
) -> MobileNet:
    """A MobileNetV2 from V2 Table 2 at ``width_mult`` and ``depth_mult``; ``fix_stem_head``
    (timm's): the stem and the last conv keep their widths, the first and the last rows
    their depth (see the module docstring)."""
    padding = resolve_padding(padding, keras)
    drop_path_rate = check_drop_path_rate(drop_path_rate)
    table = deepen(V2_TABLE_2, depth_mult, fix_first_last=fix_stem_head)
    rows = [(row, row.s if i == 0 else 1) for row in table for i in range(row.n)]
    # the authors' block spec list: the stem, the bottlenecks, the last 1x1 conv
    num_layers = len(rows) + 2
    # (stride, dilation) of the stem and of each block
    layout = atrous_layout([2] + [stride for _, stride in rows], output_stride)
    in_channels = STEM_CHANNELS if fix_stem_head else make_divisible(STEM_CHANNELS * width_mult)
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
    last = LAST_CHANNELS if fix_stem_head else last
    layers.append(ConvBNAct(in_channels, last, 1))
    config = ModelConfig(name, width_mult, num_classes, dropout, output_stride=output_stride)
    config = replace(config, padding=padding, keras=keras)
    eval_config = KERAS_EVAL if keras else TIMM_DEPTH_EVAL if depth_mult != 1.0 else None
    return MobileNet(layers, config, eval_config=eval_config)


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
    options = {"padding": padding, "keras": keras, "drop_path_rate": drop_path_rate}
    return build_v2("mobilenet_v2", width_mult, num_classes, dropout, output_stride, **options)


@register_model
def mobilenet_v2_110d(
    width_mult: float = 1.1,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV2 at width 1.1 and depth 1.2 (timm's ``mobilenetv2_110d``): 4,516,520
    params at 1000 classes."""
    options = {"drop_path_rate": drop_path_rate, "depth_mult": 1.2, "fix_stem_head": True}
    name = "mobilenet_v2_110d"
    return build_v2(name, width_mult, num_classes, dropout, output_stride, **options)


@register_model
def mobilenet_v2_120d(
    width_mult: float = 1.2,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV2 at width 1.2 and depth 1.4 (timm's ``mobilenetv2_120d``): 5,831,144
    params at 1000 classes."""
    options = {"drop_path_rate": drop_path_rate, "depth_mult": 1.4, "fix_stem_head": True}
    name = "mobilenet_v2_120d"
    return build_v2(name, width_mult, num_classes, dropout, output_stride, **options)
