"""MobileNetV4 (Qin et al., ECCV 2024, arXiv 2404.10518).

ImageNet-1k results (the paper's ImageNet table; top-1 / MACs / params at the model's
resolution):

==================  ==========  ======  =====  ======
model               resolution  top-1   MACs   params
==================  ==========  ======  =====  ======
MNv4-Conv-S         224         73.8%   0.2G   3.8M
MNv4-Conv-M         256         79.9%   1.0G   9.2M
MNv4-Hybrid-M       256         80.7%   1.2G   10.5M
MNv4-Conv-L         384         82.9%   5.9G   31M
MNv4-Hybrid-L       384         83.4%   7.2G   35.9M
==================  ==========  ======  =====  ======

Each architecture is declared as its table in the paper's appendix, one row per block
(repeats written out), with the paper's columns: block, DW K1 (the depthwise conv before
the expansion), DW K2 (the one after it), expanded dim, output dim, stride. Mobile MQA
rows carry the attention's heads, key/value dim and key/value stride instead. The rows
follow the authors' released reference (TF model garden), which timm reproduces: where
the printed table and the released models differ (Conv-S's first two stages are plain
conv-BN-ReLU layers, not fused IBs with a linear projection), the released models win,
so that their checkpoints load. Every block other than a Conv2D row is a residual block
when its stride is 1 and its input and output widths agree; the hybrid models add a
layer scale (init 1e-5) to every UIB and MQA block.

Width multiplier alpha, as in timm's ``mobilenetv4_*_035/050/075``: the output dims
become ``make_divisible(out * alpha)``; the expansion keeps its ratio to the block's
input, ``make_divisible(exp / in * in_alpha)``; the stem never drops below its width at
alpha = 1 and the 1280-wide head layer is never scaled; attention heads and key dims are
not scaled. The resolution multiplier only changes the input size: any side >= 32 works
(the key/value downsampling of Mobile MQA rounds odd maps up).

``drop_path_rate``: stochastic depth on the residual blocks' branches, as the authors
trained the models (their ImageNet configs: ``stochastic_depth_drop_rate: 0.075``, not
flat). A convolutional block at depth ``i`` of the authors' block spec list (stem, rows,
last conv, global pool, head conv) gets ``rate * (i + 1) / len(list)``
(:func:`~mobilenet.models.base.layer_drop_path`); a Mobile MQA block gets ``rate``
itself, as the authors' backbone passes it the flat rate whatever the schedule. 0, the
default, adds no module.

Anti-aliased variants (timm's ``mobilenetv4_conv_aa_medium``, ``mobilenetv4_conv_aa_large``,
``mobilenetv4_conv_blur_medium``; not in the paper): Conv-M's and Conv-L's tables with
every strided block downsampling after its nonlinearity instead of in its conv (Zhang,
ICML 2019, "Making Convolutional Networks Shift-Invariant Again"): the fused IB's full conv
and the UIB's strided depthwise conv (the middle one, else the starting one) run at stride
1, then BN and activation, then the downsampler (timm's ``aa_layer``, :data:`ANTI_ALIAS`):
2x2 average pooling (``aa``) or a 3x3 binomial blur with zero padding (``blur``: timm's
``"blurpc"``). The stem keeps its strided conv, as in timm. The downsamplers have no
weights: the state dicts are those of Conv-M and Conv-L.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

from torch import nn

from ..blocks import FusedInvertedBottleneck, MobileMQA, UniversalInvertedBottleneck
from ..layers import ActLayer, AntiAlias, BlurPool2d, ConvBNAct, avg_pool_aa, make_divisible
from .base import EvalConfig, MobileNet, ModelConfig, check_drop_path_rate, layer_drop_path
from .registry import register_model

__all__ = [
    "ANTI_ALIAS",
    "CONV_L",
    "CONV_M",
    "CONV_S",
    "HYBRID_L",
    "HYBRID_M",
    "MobileNetV4",
    "build_v4",
]

# The paper's block names. UIB instances (Section 4.1, Figure 4) by their depthwise convs:
CONV = "Conv2D"  # full conv, BN, act (no residual)
FUSED = "FusedIB"  # full kxk conv expands, 1x1 projects
EXTRA_DW = "ExtraDW"  # DW K1 and DW K2
IB = "IB"  # DW K2 only: MobileNetV2's inverted bottleneck
CONVNEXT = "ConvNext"  # DW K1 only
FFN = "FFN"  # no depthwise conv

ACTIVATIONS: dict[str, ActLayer] = {"ReLU": nn.ReLU, "GELU": nn.GELU}


class Block(NamedTuple):
    """One convolutional row: block, DW K1, DW K2, expanded dim, output dim, stride.
    A Conv2D or FusedIB row has its full conv's kernel in ``k1``."""

    block: str
    k1: int
    k2: int
    exp: int
    out: int
    s: int


class MQA(NamedTuple):
    """One Mobile MQA row (Section 4.2): heads, key (= value) dim, key/value stride,
    output dim. The block keeps the map's size."""

    heads: int
    key_dim: int
    kv_stride: int
    out: int


class Spec(NamedTuple):
    stem: int  # Conv2D 3x3, stride 2
    rows: tuple[Block | MQA, ...]
    last: int  # Conv2D 1x1 (the last feature map)
    head: int  # Conv2D 1x1 + BN on the pooled features
    act: str
    layer_scale: float | None  # hybrid models: 1e-5 on every UIB and MQA block
    eval: EvalConfig


def _eval(resolution: int, crop_pct: float = 0.95) -> EvalConfig:
    # timm's eval settings of the released checkpoints: bicubic, 0.95 crop above 224.
    return EvalConfig(resolution=resolution, crop_pct=crop_pct, interpolation="bicubic")


B = Block
# MNv4-Conv-S, the paper's appendix architecture table, 224x224x3 input.
CONV_S = Spec(
    stem=32,
    rows=(
        # block      k1 k2  exp  out  s
        B(CONV, 3, 0, 32, 32, 2),  # 112 -> 56
        B(CONV, 1, 0, 32, 32, 1),
        B(CONV, 3, 0, 96, 96, 2),  # 56 -> 28
        B(CONV, 1, 0, 64, 64, 1),
        B(EXTRA_DW, 5, 5, 192, 96, 2),  # 28 -> 14
        B(IB, 0, 3, 192, 96, 1),
        B(IB, 0, 3, 192, 96, 1),
        B(IB, 0, 3, 192, 96, 1),
        B(IB, 0, 3, 192, 96, 1),
        B(CONVNEXT, 3, 0, 384, 96, 1),
        B(EXTRA_DW, 3, 3, 576, 128, 2),  # 14 -> 7
        B(EXTRA_DW, 5, 5, 512, 128, 1),
        B(IB, 0, 5, 512, 128, 1),
        B(IB, 0, 5, 384, 128, 1),
        B(IB, 0, 3, 512, 128, 1),
        B(IB, 0, 3, 512, 128, 1),
    ),
    last=960,
    head=1280,
    act="ReLU",
    layer_scale=None,
    eval=_eval(224, 0.875),
)

# MNv4-Conv-M, the paper's appendix architecture table, 256x256x3 input.
CONV_M = Spec(
    stem=32,
    rows=(
        # block      k1 k2  exp   out  s
        B(FUSED, 3, 0, 128, 48, 2),  # 128 -> 64
        B(EXTRA_DW, 3, 5, 192, 80, 2),  # 64 -> 32
        B(EXTRA_DW, 3, 3, 160, 80, 1),
        B(EXTRA_DW, 3, 5, 480, 160, 2),  # 32 -> 16
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        B(EXTRA_DW, 3, 5, 640, 160, 1),
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        B(CONVNEXT, 3, 0, 640, 160, 1),
        B(FFN, 0, 0, 320, 160, 1),
        B(CONVNEXT, 3, 0, 640, 160, 1),
        B(EXTRA_DW, 5, 5, 960, 256, 2),  # 16 -> 8
        B(EXTRA_DW, 5, 5, 1024, 256, 1),
        B(EXTRA_DW, 3, 5, 1024, 256, 1),
        B(EXTRA_DW, 3, 5, 1024, 256, 1),
        B(FFN, 0, 0, 1024, 256, 1),
        B(CONVNEXT, 3, 0, 1024, 256, 1),
        B(EXTRA_DW, 3, 5, 512, 256, 1),
        B(EXTRA_DW, 5, 5, 1024, 256, 1),
        B(FFN, 0, 0, 1024, 256, 1),
        B(FFN, 0, 0, 1024, 256, 1),
        B(CONVNEXT, 5, 0, 512, 256, 1),
    ),
    last=960,
    head=1280,
    act="ReLU",
    layer_scale=None,
    eval=_eval(256),
)

# MNv4-Hybrid-M, the paper's appendix architecture table, 256x256x3 input: Conv-M's
# stages with Mobile MQA interleaved in the last two (keys and values downsampled 2x at stride 16).
HYBRID_M = Spec(
    stem=32,
    rows=(
        # block      k1 k2  exp   out  s      MQA(heads, key dim, kv stride, out)
        B(FUSED, 3, 0, 128, 48, 2),  # 128 -> 64
        B(EXTRA_DW, 3, 5, 192, 80, 2),  # 64 -> 32
        B(EXTRA_DW, 3, 3, 160, 80, 1),
        B(EXTRA_DW, 3, 5, 480, 160, 2),  # 32 -> 16
        B(FFN, 0, 0, 320, 160, 1),
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        B(EXTRA_DW, 3, 5, 640, 160, 1),
        MQA(4, 64, 2, 160),
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        MQA(4, 64, 2, 160),
        B(CONVNEXT, 3, 0, 640, 160, 1),
        MQA(4, 64, 2, 160),
        B(EXTRA_DW, 3, 3, 640, 160, 1),
        MQA(4, 64, 2, 160),
        B(CONVNEXT, 3, 0, 640, 160, 1),
        B(EXTRA_DW, 5, 5, 960, 256, 2),  # 16 -> 8
        B(EXTRA_DW, 5, 5, 1024, 256, 1),
        B(EXTRA_DW, 3, 5, 1024, 256, 1),
        B(EXTRA_DW, 3, 5, 1024, 256, 1),
        B(FFN, 0, 0, 512, 256, 1),
        B(EXTRA_DW, 3, 5, 512, 256, 1),
        B(FFN, 0, 0, 512, 256, 1),
        B(FFN, 0, 0, 1024, 256, 1),
        MQA(4, 64, 1, 256),
        B(CONVNEXT, 3, 0, 1024, 256, 1),
        MQA(4, 64, 1, 256),
        B(EXTRA_DW, 5, 5, 1024, 256, 1),
        MQA(4, 64, 1, 256),
        B(CONVNEXT, 5, 0, 1024, 256, 1),
        MQA(4, 64, 1, 256),
        B(CONVNEXT, 5, 0, 1024, 256, 1),
    ),
    last=960,
    head=1280,
    act="ReLU",
    layer_scale=1e-5,
    eval=_eval(256),
)

# The stride-16 stage of Conv-L and Hybrid-L begins alike, and so does the stride-32 one.
_L_STEM_ROWS = (
    # block      k1 k2  exp  out  s
    B(FUSED, 3, 0, 96, 48, 2),  # 192 -> 96
    B(EXTRA_DW, 3, 5, 192, 96, 2),  # 96 -> 48
    B(EXTRA_DW, 3, 3, 384, 96, 1),
    B(EXTRA_DW, 3, 5, 384, 192, 2),  # 48 -> 24
    B(EXTRA_DW, 3, 3, 768, 192, 1),
    B(EXTRA_DW, 3, 3, 768, 192, 1),
    B(EXTRA_DW, 3, 3, 768, 192, 1),
    B(EXTRA_DW, 3, 5, 768, 192, 1),
)
_L_STAGE_5 = (
    B(EXTRA_DW, 5, 5, 768, 512, 2),  # 24 -> 12
    B(EXTRA_DW, 5, 5, 2048, 512, 1),
    B(EXTRA_DW, 5, 5, 2048, 512, 1),
    B(EXTRA_DW, 5, 5, 2048, 512, 1),
    B(CONVNEXT, 5, 0, 2048, 512, 1),
    B(EXTRA_DW, 5, 3, 2048, 512, 1),
    B(CONVNEXT, 5, 0, 2048, 512, 1),
    B(CONVNEXT, 5, 0, 2048, 512, 1),
    B(EXTRA_DW, 5, 3, 2048, 512, 1),
    B(EXTRA_DW, 5, 5, 2048, 512, 1),
)

# MNv4-Conv-L, the paper's appendix architecture table, 384x384x3 input.
CONV_L = Spec(
    stem=24,
    rows=(
        *_L_STEM_ROWS,
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(CONVNEXT, 3, 0, 768, 192, 1),
        *_L_STAGE_5,
        B(CONVNEXT, 5, 0, 2048, 512, 1),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
    ),
    last=960,
    head=1280,
    act="ReLU",
    layer_scale=None,
    eval=_eval(384),
)

# MNv4-Hybrid-L, the paper's appendix architecture table, 384x384x3 input: Conv-L with
# Mobile MQA in the last two stages, and GELU throughout.
HYBRID_L = Spec(
    stem=24,
    rows=(
        *_L_STEM_ROWS,
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        MQA(8, 48, 2, 192),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        MQA(8, 48, 2, 192),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        MQA(8, 48, 2, 192),
        B(EXTRA_DW, 5, 3, 768, 192, 1),
        MQA(8, 48, 2, 192),
        B(CONVNEXT, 3, 0, 768, 192, 1),
        *_L_STAGE_5,
        MQA(8, 64, 1, 512),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
        MQA(8, 64, 1, 512),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
        MQA(8, 64, 1, 512),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
        MQA(8, 64, 1, 512),
        B(CONVNEXT, 5, 0, 2048, 512, 1),
    ),
    last=960,
    head=1280,
    act="GELU",
    layer_scale=1e-5,
    eval=_eval(384),
)


# timm's ``aa_layer`` names -> the downsampler a strided block applies after its activation
ANTI_ALIAS: dict[str, AntiAlias] = {
    "avg": avg_pool_aa,  # 2x2 average pooling
    "blur": BlurPool2d,  # 3x3 binomial filter, mirrored padding (timm's BlurPool2d default)
    "blurpc": partial(BlurPool2d, pad_mode="constant"),  # the same, zero padding
}


class MobileNetV4(MobileNet):
    """A MobileNetV4: the uniform :class:`MobileNet` API, with V4's head (1x1 conv, BN and
    activation on the pooled features). Its own class so that checkpoint layouts written
    for V4 are told apart from those of V1-V3."""


def _block(
    row: Block | MQA,
    in_ch: int,
    paper_in: int,
    out: int,
    act: ActLayer,
    scale: float | None,
    drop_path: tuple[float, float],
    aa: AntiAlias | None = None,
) -> nn.Module:
    """One row as a block; ``drop_path``: the (flat, depth-scheduled) stochastic depth;
    ``aa``: the anti-aliased downsampler of a strided convolutional row."""
    flat, scheduled = drop_path
    if isinstance(row, MQA):
        return MobileMQA(
            in_ch, out, row.heads, row.key_dim, row.kv_stride, layer_scale=scale, drop_path=flat
        )
    exp = make_divisible(in_ch * row.exp / paper_in)
    if row.block == CONV:
        return ConvBNAct(in_ch, out, row.k1, row.s, act=act, aa=aa)
    if row.block == FUSED:
        return FusedInvertedBottleneck(in_ch, exp, out, row.k1, row.s, act, scheduled, aa=aa)
    return UniversalInvertedBottleneck(
        in_ch, exp, out, row.k1, row.k2, row.s, act, scale, scheduled, aa=aa
    )


def build_v4(
    name: str,
    spec: Spec,
    width_mult: float,
    num_classes: int,
    dropout: float,
    drop_path_rate: float = 0.0,
    aa: AntiAlias | None = None,
) -> MobileNetV4:
    """A MobileNetV4 from its table, ``width_mult`` and ``drop_path_rate`` applied as the
    module docstring says; ``aa``: the anti-aliased downsampler of every strided block
    after the stem (None: strided convs, as in the paper)."""
    drop_path_rate = check_drop_path_rate(drop_path_rate)
    # TF Model Garden's backbone (official/vision/modeling/backbones/mobilenet.py) counts
    # its whole block spec list: stem, rows, last conv, global pool, head conv; and gives
    # Mobile MQA ("mhsa") blocks the flat rate, the others the scheduled one.
    num_layers = len(spec.rows) + 4
    act = ACTIVATIONS[spec.act]
    stem = max(spec.stem, make_divisible(spec.stem * width_mult))
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, stride=2, act=act)]
    paper_in, in_ch = spec.stem, stem
    for row in spec.rows:
        out = make_divisible(row.out * width_mult)
        rates = (drop_path_rate, layer_drop_path(drop_path_rate, len(layers), num_layers))
        layers.append(_block(row, in_ch, paper_in, out, act, spec.layer_scale, rates, aa))
        paper_in, in_ch = row.out, out
    layers.append(ConvBNAct(in_ch, make_divisible(spec.last * width_mult), 1, act=act))
    config = ModelConfig(name, width_mult, num_classes, dropout)
    return MobileNetV4(layers, config, spec.head, act, eval_config=spec.eval, head_norm=True)


@register_model
def mobilenet_v4_conv_small(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-S (the paper's appendix table), evaluated at 224."""
    name = "mobilenet_v4_conv_small"
    return build_v4(name, CONV_S, width_mult, num_classes, dropout, drop_path_rate)


@register_model
def mobilenet_v4_conv_medium(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-M (the paper's appendix table), evaluated at 256."""
    name = "mobilenet_v4_conv_medium"
    return build_v4(name, CONV_M, width_mult, num_classes, dropout, drop_path_rate)


@register_model
def mobilenet_v4_conv_large(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-L (the paper's appendix table), evaluated at 384."""
    name = "mobilenet_v4_conv_large"
    return build_v4(name, CONV_L, width_mult, num_classes, dropout, drop_path_rate)


@register_model
def mobilenet_v4_hybrid_medium(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Hybrid-M (the paper's appendix table), evaluated at 256."""
    name = "mobilenet_v4_hybrid_medium"
    return build_v4(name, HYBRID_M, width_mult, num_classes, dropout, drop_path_rate)


@register_model
def mobilenet_v4_hybrid_large(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Hybrid-L (the paper's appendix table), evaluated at 384."""
    name = "mobilenet_v4_hybrid_large"
    return build_v4(name, HYBRID_L, width_mult, num_classes, dropout, drop_path_rate)


@register_model
def mobilenet_v4_conv_aa_medium(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-M downsampling by 2x2 average pooling (timm's
    ``mobilenetv4_conv_aa_medium``), evaluated at 256."""
    name = "mobilenet_v4_conv_aa_medium"
    aa = ANTI_ALIAS["avg"]
    return build_v4(name, CONV_M, width_mult, num_classes, dropout, drop_path_rate, aa)


@register_model
def mobilenet_v4_conv_blur_medium(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-M downsampling by a zero-padded binomial blur (timm's
    ``mobilenetv4_conv_blur_medium``, ``aa_layer="blurpc"``), evaluated at 224 as its
    published checkpoint (``e500_r224_in1k``)."""
    name = "mobilenet_v4_conv_blur_medium"
    spec = CONV_M._replace(eval=_eval(224))
    aa = ANTI_ALIAS["blurpc"]
    return build_v4(name, spec, width_mult, num_classes, dropout, drop_path_rate, aa)


@register_model
def mobilenet_v4_conv_aa_large(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.2,
    drop_path_rate: float = 0.0,
) -> MobileNetV4:
    """MNv4-Conv-L downsampling by 2x2 average pooling (timm's
    ``mobilenetv4_conv_aa_large``), evaluated at 448 as timm's default checkpoint
    (``e230_r448_in12k_ft_in1k``)."""
    name = "mobilenet_v4_conv_aa_large"
    spec = CONV_L._replace(eval=_eval(448))
    aa = ANTI_ALIAS["avg"]
    return build_v4(name, spec, width_mult, num_classes, dropout, drop_path_rate, aa)
