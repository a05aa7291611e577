"""MobileNetV3 (Howard et al., ICCV 2019, arXiv 1905.02244).

ImageNet results (V3 Table 3; top-1 / MAdds / params):

=============================  ======  =====  ======
model                          top-1   MAdds  params
=============================  ======  =====  ======
Large 1.0                      75.2%   219M   5.4M
Large 0.75                     73.3%   155M   4.0M
Small 1.0                      67.4%    56M   2.5M
Small 0.75                     65.4%    44M   2.0M
Large minimalistic             72.3%   209M   3.9M
Small minimalistic             61.9%    65M   2.0M
=============================  ======  =====  ======

The tables below keep the paper's columns, expansion sizes ``exp`` included. Width
multiplier alpha, as in the authors' TF reference (and timm): ``out`` becomes
``make_divisible(out * alpha)``; the expansion keeps its ratio to the block's input,
``make_divisible(exp / in * in_alpha)``; the stem never drops below 16 channels and the
1280 / 1024-channel head layer is never scaled. At alpha = 1 this is exactly the paper's
table (and torchvision's model). "Minimalistic" variants (V3 Section 6.1.1 and the TF
reference) drop squeeze-excite and h-swish and use 3x3 kernels only: one switch applied
to the same table.

Output stride 16 or 8 (V3 Section 6.4: "atrous convolution in the last block"): the last
stage (at 8 the 80/48-channel stage too) keeps stride 1 and its depthwise convs are
dilated, in DeepLab's convention (timm's ``output_stride``) for the classifiers, in
torchvision's (``dilated=True``, the block giving up its stride dilated too) for the
segmentation models that load torchvision's checkpoints; see
:mod:`mobilenet.models.atrous`.

``drop_path_rate``: stochastic depth on the residual bnecks' branches, growing linearly
with depth towards ``drop_path_rate`` as the authors' code schedules it
(:func:`~mobilenet.models.base.layer_drop_path`); 0, the default, adds no module.

``padding="same"``: TF's SAME padding, as the authors' checkpoints (and timm's ``tf_*``
ports of them) were trained with. ``keras=True`` builds Keras' ``MobileNetV3Large`` /
``MobileNetV3Small`` (whose weights :mod:`.keras_layouts` reads): SAME padding and, where
Keras differs from the TF reference, its widths: a 16-channel stem at any alpha, the last
conv at ``make_divisible(6 * last block)``, the head layer scaled by alpha above 1 (all
equal to ours at alpha <= 1 with Keras' published widths 0.75 and 1.0). Keras' built-in
``Rescaling`` layer (``[0, 255] -> [-1, 1]``) is not part of the model: ours takes inputs
in [-1, 1] (mean 0.5, std 0.5 on [0, 1] images), as Keras' models with
``include_preprocessing=False`` do.

Depth multiplier (timm's ``mobilenetv3_large_150d``: width 1.5, depth 1.2; not in the
paper), as timm applies it to its block strings: the table's rows fall into stages (runs
of rows with the same output width; the last 1x1 conv is a stage of its own) and, within
a stage, block kinds (a row at stride 1 with the kernel, expansion ratio ``exp / in``, SE
and NL of the row before it repeats that row's kind). Each stage's depth is scaled by
:func:`~mobilenet.models.mobilenet_v2.scale_depth` (``ceil``, then shared out to the kinds
from the last one, half to even), a repeated row keeping its kind's expansion ratio at
stride 1. At 1.2 Large's stages of 1, 2, 3, 4, 2, 3 and 1 layers become 2, 3, 4, 5, 3, 4
and 2 (the 80-wide stage's kinds 1, 1, 2 become 1, 2, 2; the last 1x1 conv is doubled,
its second copy ``960 alpha -> 960 alpha``); the stem and the 1280 head are not scaled.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from torch import nn

from ..blocks import InvertedResidual
from ..layers import ActLayer, ConvBNAct, make_divisible
from .atrous import atrous_layout
from .base import EvalConfig, MobileNet, ModelConfig, check_drop_path_rate, layer_drop_path
from .mobilenet_v2 import scale_depth
from .padding import KERAS_EVAL, TF_PREPROCESS, resolve_padding
from .registry import register_model

__all__ = [
    "V3_LARGE",
    "V3_SMALL",
    "build_v3",
    "deepen",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "reduced_tail",
]

RE, HS = "RE", "HS"
ACTIVATIONS: dict[str, ActLayer] = {RE: nn.ReLU, HS: nn.Hardswish}


class Bneck(NamedTuple):
    """One bneck row of V3 Tables 1-2: kernel k, expansion size, out channels, SE, NL, s."""

    k: int
    exp: int
    out: int
    se: bool
    nl: str
    s: int


class Spec(NamedTuple):
    stem: int  # conv2d 3x3, stride 2, HS
    bnecks: tuple[Bneck, ...]
    last: int  # conv2d 1x1, HS (pooled afterwards)
    head: int  # conv2d 1x1 NBN on the pooled features, HS
    last_n: int = 1  # repeats of the last conv (2 in timm's depth-scaled large_150d)


# V3 Table 1: MobileNetV3-Large, 224x224x3 input.
V3_LARGE = Spec(
    stem=16,
    bnecks=(
        #     k  exp  out   SE     NL  s
        Bneck(3, 16, 16, False, RE, 1),  # 112x112x16
        Bneck(3, 64, 24, False, RE, 2),  # 112x112x16 -> 56x56
        Bneck(3, 72, 24, False, RE, 1),  # 56x56x24
        Bneck(5, 72, 40, True, RE, 2),  # 56x56x24 -> 28x28
        Bneck(5, 120, 40, True, RE, 1),  # 28x28x40
        Bneck(5, 120, 40, True, RE, 1),  # 28x28x40
        Bneck(3, 240, 80, False, HS, 2),  # 28x28x40 -> 14x14
        Bneck(3, 200, 80, False, HS, 1),  # 14x14x80
        Bneck(3, 184, 80, False, HS, 1),  # 14x14x80
        Bneck(3, 184, 80, False, HS, 1),  # 14x14x80
        Bneck(3, 480, 112, True, HS, 1),  # 14x14x80
        Bneck(3, 672, 112, True, HS, 1),  # 14x14x112
        Bneck(5, 672, 160, True, HS, 2),  # 14x14x112 -> 7x7
        Bneck(5, 960, 160, True, HS, 1),  # 7x7x160
        Bneck(5, 960, 160, True, HS, 1),  # 7x7x160
    ),
    last=960,
    head=1280,
)

# V3 Table 2: MobileNetV3-Small, 224x224x3 input. (The table marks SE on the last 1x1
# conv too; the released models, like torchvision and timm, apply none there.)
V3_SMALL = Spec(
    stem=16,
    bnecks=(
        #     k  exp  out   SE     NL  s
        Bneck(3, 16, 16, True, RE, 2),  # 112x112x16 -> 56x56
        Bneck(3, 72, 24, False, RE, 2),  # 56x56x16 -> 28x28
        Bneck(3, 88, 24, False, RE, 1),  # 28x28x24
        Bneck(5, 96, 40, True, HS, 2),  # 28x28x24 -> 14x14
        Bneck(5, 240, 40, True, HS, 1),  # 14x14x40
        Bneck(5, 240, 40, True, HS, 1),  # 14x14x40
        Bneck(5, 120, 48, True, HS, 1),  # 14x14x40
        Bneck(5, 144, 48, True, HS, 1),  # 14x14x48
        Bneck(5, 288, 96, True, HS, 2),  # 14x14x48 -> 7x7
        Bneck(5, 576, 96, True, HS, 1),  # 7x7x96
        Bneck(5, 576, 96, True, HS, 1),  # 7x7x96
    ),
    last=576,
    head=1024,
)


def reduced_tail(spec: Spec) -> Spec:
    """The detection backbone of V3 Section 6.3: the last stage's channels halved.

    "We reduce the channel counts of all feature layers between C4 and C5 by a factor of
    2" (the paper: 15% less latency, no loss of mAP on COCO). The first stride-32 block
    keeps its expansion (its expansion layer is SSDLite's C4 feature) and halves its
    output; the blocks after it halve both, and so does the last 1x1 conv. This is
    torchvision's ``reduced_tail=True``.
    """
    first = max(i for i, row in enumerate(spec.bnecks) if row.s == 2)
    rows = list(spec.bnecks[:first])
    rows.append(spec.bnecks[first]._replace(out=spec.bnecks[first].out // 2))
    rows += [row._replace(exp=row.exp // 2, out=row.out // 2) for row in spec.bnecks[first + 1 :]]
    return spec._replace(bnecks=tuple(rows), last=spec.last // 2)


def _kinds(spec: Spec) -> list[list[list[Bneck]]]:
    """The bnecks as timm's stages (same output width) of block kinds (see the module
    docstring): ``stages[i][j]`` lists the rows of kind ``j`` of stage ``i``."""
    stages: list[list[list[Bneck]]] = []
    previous, paper_in = None, spec.stem
    for row in spec.bnecks:
        kind = (row.k, row.exp / paper_in, row.se, row.nl)
        if previous is None or row.out != previous[0].out:
            stages.append([[row]])
        elif row.s == 1 and kind == previous[1]:
            stages[-1][-1].append(row)
        else:
            stages[-1].append([row])
        previous, paper_in = (row, kind), row.out
    return stages


def deepen(spec: Spec, depth_mult: float) -> Spec:
    """``spec`` at depth ``depth_mult``, as timm's ``decode_arch_def`` scales its V3 stages
    (``depth_trunc='ceil'``, :func:`~mobilenet.models.mobilenet_v2.scale_depth`): a kind
    that grows repeats its last row, or, where that row is the stage's first, the row at
    stride 1 with the kind's expansion ratio on its own width."""
    rows: list[Bneck] = []
    paper_in = spec.stem
    for stage in _kinds(spec):
        for kind, n in zip(stage, scale_depth([len(k) for k in stage], depth_mult), strict=True):
            first = kind[0]
            repeat = kind[-1] if len(kind) > 1 else first._replace(s=1)
            if len(kind) == 1:  # the kind's ratio, exp / in, on the row's own width
                repeat = repeat._replace(exp=round(first.exp * first.out / paper_in))
            rows += (kind + [repeat] * n)[:n]
            paper_in = first.out
    last_n = scale_depth([spec.last_n], depth_mult)[0]
    return spec._replace(bnecks=tuple(rows), last_n=last_n)


def build_v3(
    name: str,
    spec: Spec,
    width_mult: float,
    num_classes: int,
    dropout: float,
    minimal: bool,
    output_stride: int = 32,
    whole_stage: bool = False,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
    depth_mult: float = 1.0,
    eval_config: EvalConfig | None = None,
) -> MobileNet:
    """A MobileNetV3 from a table (``minimal``: no SE, ReLU only, 3x3 kernels only), at
    ``output_stride`` (``whole_stage``: torchvision's dilation convention), padded as
    ``padding`` ("symmetric" or "same"), or Keras' build (``keras``), with stochastic
    depth ``drop_path_rate``, deepened by ``depth_mult`` (:func:`deepen`), evaluated as
    ``eval_config`` says (None: the default, or Keras')."""
    padding = resolve_padding(padding, keras)
    drop_path_rate = check_drop_path_rate(drop_path_rate)
    spec = deepen(spec, depth_mult) if depth_mult != 1.0 else spec
    # the authors' block spec list: stem, bnecks, last conv(s), global pool, head conv
    num_layers = len(spec.bnecks) + spec.last_n + 3

    def act(nl: str) -> ActLayer:
        return nn.ReLU if minimal else ACTIVATIONS[nl]

    # (stride, dilation) of the stem and of each bneck
    layout = atrous_layout([2] + [row.s for row in spec.bnecks], output_stride, whole_stage)
    stem = spec.stem if keras else max(spec.stem, make_divisible(spec.stem * width_mult))
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, stride=2, act=act(HS), padding=padding)]
    paper_in, in_channels = spec.stem, stem
    for row, (stride, dilation) in zip(spec.bnecks, layout[1:], strict=True):
        exp = make_divisible(in_channels * row.exp / paper_in)
        out = make_divisible(row.out * width_mult)
        kernel = 3 if minimal else row.k
        use_se = row.se and not minimal
        block_act = act(row.nl)
        drop_path = layer_drop_path(drop_path_rate, len(layers), num_layers)
        block = InvertedResidual(
            in_channels, exp, out, kernel, stride, use_se, block_act, dilation, padding, drop_path
        )
        layers.append(block)
        paper_in, in_channels = row.out, out
    if keras:  # Keras: 6x the last block's width, and a head widened above alpha 1
        last = make_divisible(in_channels * spec.last / paper_in)
        head = make_divisible(spec.head * width_mult) if width_mult > 1 else spec.head
    else:
        last, head = make_divisible(spec.last * width_mult), spec.head
    for i in range(spec.last_n):
        layers.append(ConvBNAct(last if i else in_channels, last, 1, act=act(HS)))
    config = ModelConfig(
        name, width_mult, num_classes, dropout, output_stride=output_stride, padding=padding
    )
    config = replace(config, keras=keras)
    eval_config = KERAS_EVAL if keras else eval_config
    return MobileNet(layers, config, head, act(HS), eval_config)


@register_model
def mobilenet_v3_large(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV3-Large (V3 Table 1): 5,483,032 params and 216.6M MAdds at 1.0-224."""
    name = "mobilenet_v3_large"
    options = {
        "output_stride": output_stride,
        "padding": padding,
        "keras": keras,
        "drop_path_rate": drop_path_rate,
    }
    return build_v3(name, V3_LARGE, width_mult, num_classes, dropout, minimal=False, **options)


@register_model
def mobilenet_v3_small(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV3-Small (V3 Table 2): 2,542,856 params and 56.5M MAdds at 1.0-224."""
    name = "mobilenet_v3_small"
    options = {
        "output_stride": output_stride,
        "padding": padding,
        "keras": keras,
        "drop_path_rate": drop_path_rate,
    }
    return build_v3(name, V3_SMALL, width_mult, num_classes, dropout, minimal=False, **options)


@register_model
def mobilenet_v3_large_minimal(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV3-Large minimalistic: no SE, ReLU only, 3x3 kernels only."""
    name = "mobilenet_v3_large_minimal"
    options = {
        "output_stride": output_stride,
        "padding": padding,
        "keras": keras,
        "drop_path_rate": drop_path_rate,
    }
    return build_v3(name, V3_LARGE, width_mult, num_classes, dropout, minimal=True, **options)


@register_model
def mobilenet_v3_small_minimal(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV3-Small minimalistic: no SE, ReLU only, 3x3 kernels only."""
    name = "mobilenet_v3_small_minimal"
    options = {
        "output_stride": output_stride,
        "padding": padding,
        "keras": keras,
        "drop_path_rate": drop_path_rate,
    }
    return build_v3(name, V3_SMALL, width_mult, num_classes, dropout, minimal=True, **options)


@register_model
def mobilenet_v3_large_150d(
    width_mult: float = 1.5,
    num_classes: int = 1000,
    dropout: float = 0.2,
    output_stride: int = 32,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV3-Large at width 1.5 and depth 1.2 (timm's ``mobilenetv3_large_150d``):
    14,622,320 params, evaluated as its checkpoint (``ra4_e3600_r256_in1k``: 256, crop
    0.95, inputs scaled to [-1, 1])."""
    name = "mobilenet_v3_large_150d"
    eval_config = EvalConfig(resolution=256, crop_pct=0.95, **TF_PREPROCESS)
    options = {
        "output_stride": output_stride,
        "drop_path_rate": drop_path_rate,
        "depth_mult": 1.2,
        "eval_config": eval_config,
    }
    return build_v3(name, V3_LARGE, width_mult, num_classes, dropout, minimal=False, **options)
