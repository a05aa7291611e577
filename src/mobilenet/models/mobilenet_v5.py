"""MobileNetV5: the vision encoder of Gemma 3n (Google, 2025), as timm 1.0 builds it.

There is no MobileNetV5 paper: the architecture is the one of timm's
``timm/models/mobilenetv5.py`` (``_gen_mobilenet_v5``'s ``arch_def``, from which Gemma 3n's
checkpoints load), made of MobileNetV4's blocks (arXiv 2404.10518, Section 4): fused IB,
UIB and multi-query attention, with three changes. Every norm is an RMS norm
(:class:`~mobilenet.layers.RmsNorm2d`, eps 1e-6) and every activation GELU with the tanh
approximation; the stem conv has a bias; and a Multi-Scale Fusion Adapter
(:class:`~mobilenet.blocks.MultiScaleFusionAdapter`, MSFA) fuses the stride-16 and
stride-32 maps into a 16x16 map of 2048 channels: Gemma 3n's 256 image tokens.

==================  ==========  ===========  ======  ==================================
model               resolution  params       MSFA    timm
==================  ==========  ===========  ======  ==================================
MobileNetV5-300M    768         294,126,912  2048    ``mobilenetv5_300m`` (``_enc``)
MobileNetV5-Base    256         82,647,976   2048    ``mobilenetv5_base`` (1000 classes)
==================  ==========  ===========  ======  ==================================

Three models, as timm's: ``mobilenet_v5_300m`` (timm's ``mobilenetv5_300m``: the MSFA
map pooled and, with ``num_classes`` > 0, classified; 0 by default, as timm's Gemma 3n
config), ``mobilenet_v5_300m_enc`` (timm's ``mobilenetv5_300m_enc``, Gemma 3n's encoder:
``forward`` returns the MSFA map, and the convs pad as TensorFlow's SAME) and
``mobilenet_v5_base`` (timm's ``mobilenetv5_base``, a 1000-class classifier). The
uniform :class:`~mobilenet.models.base.MobileNet` API holds: ``forward_features`` is the
MSFA map (as timm's), ``feature_maps`` and ``feature_info`` the trunk's five levels
(strides 2 to 32), ``forward_head`` the pool and classifier.

Any input of at least 32 pixels a side works: the MSFA averages a larger map down to
16x16 by whole windows (768: 48x48 at stride 16, 3x3 windows) and resizes any other
(smaller, or not a multiple of 16) bilinearly, as timm does.

``width_mult`` is timm's ``channel_multiplier``: every output dim becomes
``make_divisible(out * alpha)``, expansions keep their ratio to the block's input, the
stem never drops below 64, and the attention heads, key dims and the MSFA's 2048 are not
scaled. ``drop_path_rate``: stochastic depth as timm schedules it, block ``i`` of ``n``
(the MSFA excluded) gets ``rate * i / n``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ..blocks import (
    FusedInvertedBottleneck,
    MobileMQA,
    MultiScaleFusionAdapter,
    UniversalInvertedBottleneck,
)
from ..errors import MobileNetError
from ..layers import ConvBNAct, GELUTanh, RmsNorm2d, make_divisible
from .base import EvalConfig, MobileNet, ModelConfig, check_drop_path_rate, feature_levels
from .padding import resolve_padding
from .registry import register_model

__all__ = [
    "V5_300M",
    "V5_BASE",
    "MobileNetV5",
    "MobileNetV5Encoder",
    "build_v5",
]

# Block kinds (V4 Section 4.1, Figure 4), by their depthwise convs.
FUSED = "FusedIB"  # timm "er": full kxk conv expands, 1x1 projects
EXTRA_DW = "ExtraDW"  # timm "uir" with a and k: DW K1 and DW K2
CONVNEXT = "ConvNext"  # timm "uir" with a only: DW K1
FFN = "FFN"  # timm "uir_a0_k0": no depthwise conv

LAYER_SCALE = 1e-5  # timm's layer_scale_init_value for every UIB and MQA block
MSFA_CHANNELS = 2048  # timm's num_features: Gemma 3n's token width
MSFA_SIZE = 16  # timm's msfa_output_resolution: 16x16 = 256 tokens


class Block(NamedTuple):
    """One convolutional row: block, DW K1 (a fused IB's full conv), DW K2, expansion
    ratio (of the block's input width), output dim, stride."""

    block: str
    k1: int
    k2: int
    e: float
    out: int
    s: int


class MQA(NamedTuple):
    """One Mobile MQA row: heads, key (= value) dim, key/value stride, output dim. One
    shared key/value head; the block keeps the map's size."""

    heads: int
    key_dim: int
    kv_stride: int
    out: int


class Spec(NamedTuple):
    stem: int  # Conv2D 3x3, stride 2, with bias
    rows: tuple[Block | MQA, ...]
    eval: EvalConfig


B = Block
# timm's arch_def's first two stages, alike in both sizes ("Stage 0" and "Stage 1").
_STAGES_0_1 = (
    # block      k1 k2  e  out  s
    B(FUSED, 3, 0, 4, 128, 2),  # 1/2 -> 1/4 (er_r1_k3_s2_e4_c128)
    B(FUSED, 3, 0, 4, 128, 1),
    B(FUSED, 3, 0, 4, 128, 1),
    B(EXTRA_DW, 3, 5, 6, 256, 2),  # 1/4 -> 1/8 (uir_r1_a3_k5_s2_e6_c256)
    B(CONVNEXT, 5, 0, 4, 256, 1),
    B(CONVNEXT, 3, 0, 4, 256, 1),
    B(CONVNEXT, 5, 0, 4, 256, 1),
    B(CONVNEXT, 3, 0, 4, 256, 1),
)

# MobileNetV5-300M (Gemma 3n's encoder): timm's arch_def for mobilenetv5_300m, 768x768x3.
V5_300M = Spec(
    stem=64,
    rows=(
        *_STAGES_0_1,
        # block      k1 k2  e  out  s
        B(EXTRA_DW, 5, 5, 6, 640, 2),  # 1/8 -> 1/16
        *(B(CONVNEXT, 5, 0, 4, 640, 1),) * 7,
        B(FFN, 0, 0, 1, 640, 1),
        # 14 x (MQA: 12 heads of 64, keys and values from the 2x downsampled map; FFN)
        *(MQA(12, 64, 2, 640), B(FFN, 0, 0, 2, 640, 1)) * 14,
        B(EXTRA_DW, 5, 5, 6, 1280, 2),  # 1/16 -> 1/32
        # 19 x (MQA: 16 heads of 96; FFN)
        *(MQA(16, 96, 1, 1280), B(FFN, 0, 0, 2, 1280, 1)) * 19,
    ),
    # timm's Gemma 3n config: 768x768, pixels in [0, 1] (mean 0, std 1), no crop
    eval=EvalConfig(768, 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bicubic"),
)

# MobileNetV5-Base: timm's arch_def for mobilenetv5_base, 256x256x3. timm's strings give
# its MQA rows "s2", which its builder drops (only a stage's first block strides): no
# key/value downsampling.
V5_BASE = Spec(
    stem=64,
    rows=(
        *_STAGES_0_1,
        # block      k1 k2  e  out  s
        B(EXTRA_DW, 5, 5, 6, 512, 2),  # 1/8 -> 1/16
        *(B(CONVNEXT, 5, 0, 4, 512, 1),) * 2,
        B(FFN, 0, 0, 1, 512, 1),
        *(MQA(8, 64, 1, 512), B(FFN, 0, 0, 2, 512, 1)) * 6,
        B(EXTRA_DW, 5, 5, 6, 1024, 2),  # 1/16 -> 1/32
        *(MQA(16, 64, 1, 1024), B(FFN, 0, 0, 2, 1024, 1)) * 7,
    ),
    # timm's config: 256x256, inception mean and std (0.5), no crop
    eval=EvalConfig(256, 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
)


class MobileNetV5(MobileNet):
    """A MobileNetV5: the trunk (``features``), the MSFA on its last two levels
    (``msfa``: ``forward_features``' output, as timm's), then the :class:`MobileNet`
    head: global average pool, dropout, classifier (no hidden layer)."""

    def __init__(
        self,
        features: list[nn.Module],
        config: ModelConfig,
        msfa: MultiScaleFusionAdapter,
        eval_config: EvalConfig,
    ) -> None:
        super().__init__(features, config, eval_config=eval_config)
        self.msfa = msfa
        # The MSFA reads the last layer of the stride-16 and stride-32 levels.
        self.msfa_indices = tuple(info.index for info in self.feature_info[-2:])
        self.num_features = msfa.out_channels
        self.reset_classifier(config.num_classes)  # sized for the MSFA's channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.msfa_indices:
                maps.append(x)
        return self.msfa(maps)


class MobileNetV5Encoder(MobileNetV5):
    """Gemma 3n's vision encoder (timm's ``MobileNetV5Encoder``): ``forward`` returns the
    MSFA map, ``[B, 2048, 16, 16]``; no classifier."""

    task = "encoder"  # features, not class scores: exported files say so, eval refuses them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _block(row: Block | MQA, in_ch: int, out: int, drop_path: float) -> nn.Module:
    """One row as a block of RMS norms and tanh-GELUs (timm's V5 blocks)."""
    if isinstance(row, MQA):
        return MobileMQA(
            in_ch,
            out,
            row.heads,
            row.key_dim,
            row.kv_stride,
            layer_scale=LAYER_SCALE,
            drop_path=drop_path,
            norm=RmsNorm2d,
        )
    exp = make_divisible(in_ch * row.e)
    if row.block == FUSED:  # timm's EdgeResidual: no layer scale
        return FusedInvertedBottleneck(
            in_ch, exp, out, row.k1, row.s, GELUTanh, drop_path, norm=RmsNorm2d
        )
    return UniversalInvertedBottleneck(
        in_ch, exp, out, row.k1, row.k2, row.s, GELUTanh, LAYER_SCALE, drop_path, norm=RmsNorm2d
    )


def build_v5(
    name: str,
    spec: Spec,
    width_mult: float,
    num_classes: int,
    dropout: float,
    drop_path_rate: float = 0.0,
    padding: str | None = None,
    encoder: bool = False,
) -> MobileNetV5:
    """A MobileNetV5 from its table, with the options of the module docstring; ``encoder``
    builds the :class:`MobileNetV5Encoder` (padded as TF's SAME unless told otherwise)."""
    drop_path_rate = check_drop_path_rate(drop_path_rate)
    padding = resolve_padding("same" if encoder and padding is None else padding)
    if encoder and num_classes:
        raise MobileNetError(f"{name} is an encoder without a classifier: num_classes must be 0")
    stem = max(spec.stem, make_divisible(spec.stem * width_mult))
    layers: list[nn.Module] = [ConvBNAct(3, stem, 3, 2, act=GELUTanh, bias=True, norm=RmsNorm2d)]
    in_ch = stem
    for i, row in enumerate(spec.rows):
        out = make_divisible(row.out * width_mult)
        rate = drop_path_rate * i / len(spec.rows)  # timm's schedule
        layers.append(_block(row, in_ch, out, rate))
        in_ch = out
    fused = sum(info.channels for info in feature_levels(layers)[-2:])  # strides 16, 32
    msfa = MultiScaleFusionAdapter(fused, MSFA_CHANNELS, MSFA_SIZE, 2.0, GELUTanh, RmsNorm2d)
    config = ModelConfig(name, width_mult, num_classes, dropout)
    kind = MobileNetV5Encoder if encoder else MobileNetV5
    model = kind(layers, config, msfa, spec.eval)
    if padding != "symmetric":
        model.set_padding(padding)
    return model


@register_model
def mobilenet_v5_300m(
    width_mult: float = 1.0,
    num_classes: int = 0,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    padding: str | None = None,
) -> MobileNetV5:
    """MobileNetV5-300M (timm's ``mobilenetv5_300m``): Gemma 3n's encoder with timm's
    head (pool, classifier: none by default, as timm's Gemma 3n config), evaluated at 768."""
    name = "mobilenet_v5_300m"
    return build_v5(name, V5_300M, width_mult, num_classes, dropout, drop_path_rate, padding)


@register_model(task="encoder")
def mobilenet_v5_300m_enc(
    width_mult: float = 1.0,
    num_classes: int = 0,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    padding: str | None = None,
) -> MobileNetV5:
    """MobileNetV5-300M as Gemma 3n uses it (timm's ``mobilenetv5_300m_enc``): ``forward``
    returns the 16x16x2048 MSFA map; TF "SAME" padding."""
    name = "mobilenet_v5_300m_enc"
    return build_v5(
        name, V5_300M, width_mult, num_classes, dropout, drop_path_rate, padding, encoder=True
    )


@register_model
def mobilenet_v5_base(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.0,
    drop_path_rate: float = 0.0,
    padding: str | None = None,
) -> MobileNetV5:
    """MobileNetV5-Base (timm's ``mobilenetv5_base``), evaluated at 256."""
    name = "mobilenet_v5_base"
    return build_v5(name, V5_BASE, width_mult, num_classes, dropout, drop_path_rate, padding)
