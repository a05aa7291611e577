"""The building blocks of the MobileNet family.

* :class:`DepthwiseSeparable` - MobileNetV1 (V1 Section 3.1, Figure 3): a 3x3 depthwise
  conv and a 1x1 pointwise conv, each followed by BatchNorm and ReLU6.
* :class:`InvertedResidual` - MobileNetV2's bottleneck (V2 Table 1), which MobileNetV3
  reuses with squeeze-excite, 5x5 kernels and h-swish (V3 Section 5): one class for both.
* :class:`UniversalInvertedBottleneck` - MobileNetV4's UIB (V4 Section 4.1, Figure 4):
  IB, ConvNext-like, ExtraDW and FFN as one block with two optional depthwise convs.
* :class:`FusedInvertedBottleneck` - the fused IB of V4's first stage: a full kxk conv
  expands, a 1x1 conv projects.
* :class:`MobileMQA` - V4's Mobile MQA (Section 4.2): multi-query attention with one
  shared key/value head, keys and values optionally downsampled by a strided depthwise
  conv.
* :class:`MultiScaleFusionAdapter` - MobileNetV5's MSFA: the last two stages' maps fused
  into one map of fixed size by a UIB FFN.

UIB, the fused IB and Mobile MQA take ``norm`` (:data:`~mobilenet.layers.NormLayer`):
BatchNorm by default (V4), :class:`~mobilenet.layers.RmsNorm2d` in MobileNetV5, in the
same places, under the same names.

Every block with a residual connection takes ``drop_path``, the stochastic depth rate of
its branch (:class:`~mobilenet.layers.DropPath`, applied before the residual add, never
to the shortcut); 0, the default, adds no module, so the module tree and the state dict
keys are those of a block without it. A block without a residual ignores it.

Every block records ``stride``; a block with stride 2 starts a new stage (a new output
stride), which is how detection backbones and the memory-efficient executor find their
feature levels without special cases. In an atrous backbone (:mod:`mobilenet.models.atrous`)
a block that gives up its stride records stride 1 and a ``dilation`` instead, so the
feature levels it reports are the strides it really has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MobileNetError
from .layers import (
    BN_EPS,
    BN_MOMENTUM,
    ActLayer,
    AntiAlias,
    ConvBNAct,
    DotProductAttention,
    DropPath,
    LayerScale,
    NormLayer,
    ResidualAdd,
    SqueezeExcite,
    make_divisible,
)

__all__ = [
    "DepthwiseSeparable",
    "FusedInvertedBottleneck",
    "InvertedResidual",
    "MobileMQA",
    "MultiQueryAttention",
    "MultiScaleFusionAdapter",
    "UniversalInvertedBottleneck",
]


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 layer: ``dw`` 3x3 depthwise (stride s) -> ``pw`` 1x1, both BN + ReLU6.

    Cost (V1 Section 3.1): ``Dk*Dk*M*Df*Df + M*N*Df*Df`` MAdds instead of
    ``Dk*Dk*M*N*Df*Df`` for a full convolution.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, padding: str = "symmetric"
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.dw = ConvBNAct(in_channels, in_channels, 3, stride, in_channels, padding=padding)
        self.pw = ConvBNAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (V2 Table 1; V3 Figure 4).

    ``expand`` 1x1 (k -> exp, BN, act; absent when ``exp == in``) -> ``dw`` kxk depthwise
    (stride s, BN, act) -> ``se`` squeeze-excite (V3 only) -> ``project`` 1x1 (exp -> k',
    BN, no activation: the linear bottleneck). The input is added back only when the
    stride is 1 and ``in == out``: no projection shortcut, no activation after the add.
    ``drop_path``: the branch's stochastic depth rate (see the module docstring).
    ``dilation`` > 1 makes the depthwise conv atrous (DeepLab; V2 Section 6.3, V3 Section
    6.4); the 1x1 convs are unaffected. ``padding`` is the depthwise conv's (see
    :class:`~mobilenet.layers.ConvBNAct`): a 1x1 conv pads nothing either way.
    """

    def __init__(
        self,
        in_channels: int,
        exp_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        use_se: bool = False,
        act: ActLayer = nn.ReLU6,
        dilation: int = 1,
        padding: str = "symmetric",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.dilation = dilation
        self.out_channels = out_channels
        self.use_residual = stride == 1 and in_channels == out_channels
        # pw: the expansion, skipped when the block does not expand (V2 t=1, V3 exp == in).
        if exp_channels != in_channels:
            self.expand = ConvBNAct(in_channels, exp_channels, 1, act=act)
        else:
            self.expand = nn.Identity()
        # dw
        self.dw = ConvBNAct(
            exp_channels, exp_channels, kernel_size, stride, exp_channels, act, dilation, padding
        )
        # V3 Section 5.3: SE squeezes to 1/4 of the expansion, rounded to a multiple of 8.
        if use_se:
            self.se = SqueezeExcite(exp_channels, make_divisible(exp_channels / 4))
        else:
            self.se = nn.Identity()
        # pw-linear
        self.project = ConvBNAct(exp_channels, out_channels, 1, act=None)
        self.add = ResidualAdd() if self.use_residual else None
        self.drop_path = _drop_path(drop_path, self.use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return _residual(self.add, self.drop_path, x, out)


def _drop_path(rate: float, residual: bool) -> DropPath | None:
    """The branch's :class:`DropPath`: none without a residual or at rate 0, so a block
    built without stochastic depth has exactly the modules (and state dict) it always had."""
    module = DropPath(rate)  # refuses a rate outside [0, 1) whatever the block
    return module if residual and rate > 0 else None


def _residual(
    add: ResidualAdd | None, drop_path: DropPath | None, x: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """``x + drop_path(out)`` where the block has a residual, else ``out``."""
    if add is None:
        return out
    if drop_path is not None:
        out = drop_path(out)
    return add(x, out)


def _layer_scale(channels: int, init: float | None) -> nn.Module:
    return LayerScale(channels, init) if init is not None else nn.Identity()


class UniversalInvertedBottleneck(nn.Module):
    """MobileNetV4's Universal Inverted Bottleneck (V4 Section 4.1, Figure 4).

    ``dw_start`` kxk depthwise (BN, no activation; absent when ``start_dw_kernel`` is 0)
    -> ``expand`` 1x1 (BN, act) -> ``dw_mid`` kxk depthwise (BN, act; absent when
    ``mid_dw_kernel`` is 0) -> ``project`` 1x1 (BN, linear) -> ``layer_scale`` (hybrid
    models) -> residual add when the stride is 1 and ``in == out``. The two optional
    depthwise convs give the four instances of Figure 4: IB (middle only), ConvNext-like
    (start only), ExtraDW (both) and FFN (neither). The stride sits on the middle
    depthwise conv when there is one, else on the starting one (the reference code's
    rule); an FFN cannot downsample. ``drop_path`` (residual blocks): the branch's
    stochastic depth rate, applied after the layer scale, as in the reference code.
    ``norm``: the normalisation after each conv (BatchNorm by default); ``residual=False``
    drops the residual add whatever the shapes (MobileNetV5's fusion adapter). ``aa``
    (timm's ``aa_layer``): the strided depthwise conv runs at stride 1 and this
    anti-aliased downsampler strides after its BN and activation.
    """

    def __init__(
        self,
        in_channels: int,
        exp_channels: int,
        out_channels: int,
        start_dw_kernel: int = 0,
        mid_dw_kernel: int = 3,
        stride: int = 1,
        act: ActLayer = nn.ReLU,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        norm: NormLayer | None = None,
        residual: bool = True,
        aa: AntiAlias | None = None,
    ) -> None:
        super().__init__()
        if stride > 1 and not (start_dw_kernel or mid_dw_kernel):
            raise MobileNetError("a UIB without depthwise convs (an FFN) cannot have a stride")
        self.stride = stride
        self.out_channels = out_channels
        self.use_residual = residual and stride == 1 and in_channels == out_channels
        start_stride = 1 if mid_dw_kernel else stride
        # dw (extra, before the expansion): linear, as in the reference code
        self.dw_start: nn.Module = nn.Identity()
        if start_dw_kernel:
            self.dw_start = ConvBNAct(
                in_channels,
                in_channels,
                start_dw_kernel,
                start_stride,
                in_channels,
                None,
                norm=norm,
                aa=aa,
            )
        # pw
        self.expand = ConvBNAct(in_channels, exp_channels, 1, act=act, norm=norm)
        # dw
        self.dw_mid: nn.Module = nn.Identity()
        if mid_dw_kernel:
            self.dw_mid = ConvBNAct(
                exp_channels,
                exp_channels,
                mid_dw_kernel,
                stride,
                exp_channels,
                act,
                norm=norm,
                aa=aa,
            )
        # pw-linear
        self.project = ConvBNAct(exp_channels, out_channels, 1, act=None, norm=norm)
        self.layer_scale = _layer_scale(out_channels, layer_scale)
        self.add = ResidualAdd() if self.use_residual else None
        self.drop_path = _drop_path(drop_path, self.use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw_mid(self.expand(self.dw_start(x))))
        out = self.layer_scale(out)
        return _residual(self.add, self.drop_path, x, out)


class FusedInvertedBottleneck(nn.Module):
    """Fused IB (the V4 models' first stages; EfficientNet-EdgeTPU's "fused MBConv"):
    ``expand`` full kxk conv (stride s, BN, act) doing the expansion and the spatial
    mixing at once -> ``project`` 1x1 (BN, linear) -> residual add when the stride is 1
    and ``in == out`` (``drop_path``: the branch's stochastic depth rate). Full convs are
    cheap on accelerators at high resolution, where the channels are few. ``norm``: the
    normalisation after each conv (BatchNorm by default). ``aa`` (timm's ``aa_layer``): a
    strided full conv runs at stride 1 and this downsampler strides after its activation."""

    def __init__(
        self,
        in_channels: int,
        exp_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        act: ActLayer = nn.ReLU,
        drop_path: float = 0.0,
        norm: NormLayer | None = None,
        aa: AntiAlias | None = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.use_residual = stride == 1 and in_channels == out_channels
        self.expand = ConvBNAct(
            in_channels, exp_channels, kernel_size, stride, act=act, norm=norm, aa=aa
        )
        self.project = ConvBNAct(exp_channels, out_channels, 1, act=None, norm=norm)
        self.add = ResidualAdd() if self.use_residual else None
        self.drop_path = _drop_path(drop_path, self.use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.expand(x))
        return _residual(self.add, self.drop_path, x, out)


class MultiQueryAttention(nn.Module):
    """Multi-query attention on a feature map (V4 Section 4.2, Eq. 1-2).

    ``heads`` query heads of ``key_dim`` channels each, all attending with one shared
    key head (``key_dim``) and one shared value head (``value_dim``), which is what
    makes it cheap in memory bandwidth on accelerators. Projections are 1x1 convs.
    ``kv_stride`` 2 downsamples the map the keys and values are computed from with a
    strided depthwise conv + BN (Spatial Reduction Attention); ``query_stride`` > 1
    average-pools the queries (+ BN) and upsamples the output bilinearly. The attention
    itself is a :class:`~mobilenet.layers.DotProductAttention` module, whose two matrix
    products the cost model counts as ``attention``. ``norm`` replaces those BNs
    (MobileNetV5: :class:`~mobilenet.layers.RmsNorm2d`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int,
        key_dim: int,
        value_dim: int | None = None,
        kv_stride: int = 1,
        dw_kernel: int = 3,
        query_stride: int = 1,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        value_dim = value_dim or key_dim
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.query_stride = query_stride
        self.query_down: nn.Module = nn.Identity()
        if query_stride > 1:
            pool = nn.AvgPool2d(query_stride)
            self.query_down = nn.Sequential(pool, _norm(norm, in_channels))
        self.query = nn.Conv2d(in_channels, heads * key_dim, 1, bias=False)
        self.key_down = self._kv_down(in_channels, kv_stride, dw_kernel, norm)
        self.key = nn.Conv2d(in_channels, key_dim, 1, bias=False)
        self.value_down = self._kv_down(in_channels, kv_stride, dw_kernel, norm)
        self.value = nn.Conv2d(in_channels, value_dim, 1, bias=False)
        self.attention = DotProductAttention()
        self.upsample: nn.Module = nn.Identity()
        if query_stride > 1:
            self.upsample = nn.Upsample(
                scale_factor=query_stride, mode="bilinear", align_corners=False
            )
        self.output = nn.Conv2d(heads * value_dim, out_channels, 1, bias=False)

    @staticmethod
    def _kv_down(
        channels: int, stride: int, kernel: int, norm: NormLayer | None = None
    ) -> nn.Module:
        if stride == 1:
            return nn.Identity()
        return ConvBNAct(channels, channels, kernel, stride, groups=channels, act=None, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query(self.query_down(x))  # [B, heads * key_dim, h, w]
        b, _, h, w = q.shape
        # [B, heads, L, key_dim] queries; [B, 1, P, dim] keys and values: one head, shared
        q = q.reshape(b, self.heads, self.key_dim, h * w).transpose(-1, -2).contiguous()
        k = self.key(self.key_down(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        v = self.value(self.value_down(x)).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        out = self.attention(q, k, v)  # [B, heads, L, value_dim]
        # heads stacked along channels, head-major (as the reference's reshape)
        out = out.transpose(-1, -2).reshape(b, self.heads * self.value_dim, h, w)
        return self.output(self.upsample(out))


def _norm(norm: NormLayer | None, channels: int) -> nn.Module:
    """``norm(channels)``, or the BatchNorm of the reference code when ``norm`` is None."""
    if norm is not None:
        return norm(channels)
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MobileMQA(nn.Module):
    """Mobile MQA block (V4 Section 4.2): BN (no activation) -> multi-query attention ->
    ``layer_scale`` -> [``drop_path``] -> residual add of the block's input (stride 1,
    ``in == out``). ``norm`` replaces every BN (MobileNetV5: RMS norms)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int,
        key_dim: int,
        kv_stride: int = 1,
        dw_kernel: int = 3,
        query_stride: int = 1,
        layer_scale: float | None = None,
        drop_path: float = 0.0,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        self.stride = 1  # the block keeps the map's size (query pooling is undone)
        self.out_channels = out_channels
        self.norm = _norm(norm, in_channels)
        self.attn = MultiQueryAttention(
            in_channels,
            out_channels,
            heads,
            key_dim,
            key_dim,
            kv_stride,
            dw_kernel,
            query_stride,
            norm,
        )
        self.layer_scale = _layer_scale(out_channels, layer_scale)
        self.use_residual = in_channels == out_channels
        self.add = ResidualAdd() if self.use_residual else None
        self.drop_path = _drop_path(drop_path, self.use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer_scale(self.attn(self.norm(x)))
        return _residual(self.add, self.drop_path, x, out)


def fuse_sizes(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``maps`` with each one smaller than the first (in height or width) resized to the
    first one's size, nearest neighbour: the fusion adapter's inputs, ready to stack."""
    size = maps[0].shape[-2:]
    return [
        F.interpolate(m, size=size, mode="nearest")
        if m.shape[-2] < size[0] or m.shape[-1] < size[1]
        else m
        for m in maps
    ]


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x`` brought to ``size`` as MobileNetV5's fusion adapter does (timm's rule): an
    average pool by the integer ratio when each side is a multiple of ``size``'s (a 48x48
    map to 16x16: 3x3 windows), a bilinear resize otherwise (a smaller map, or a ratio
    that is not whole)."""
    height, width = x.shape[-2:]
    if (height, width) == size:
        return x
    if height % size[0] or width % size[1]:
        return F.interpolate(x, size=size, mode="bilinear")
    # ints, not the shape's tensors a TorchScript trace (ONNX export) would make them:
    # a pooling window must be a constant in the exported graph
    kernel = (int(height) // size[0], int(width) // size[1])
    return F.avg_pool2d(x, kernel_size=kernel, stride=kernel)


# One call each in an FX graph (the cost model's): both branch on the maps' sizes.
torch.fx.wrap("fuse_sizes")
torch.fx.wrap("resize_map")


class MultiScaleFusionAdapter(nn.Module):
    """MobileNetV5's Multi-Scale Fusion Adapter (MSFA; timm's
    ``MobileNetV5MultiScaleFusionAdapter``): the last two stages' maps (output strides 16
    and 32) -> the smaller ones resized to the first one's size (nearest) -> stacked
    along channels -> ``ffn``, a UIB FFN (1x1 expand by ``expansion`` 2, norm, act; 1x1
    project, norm; no depthwise conv, no layer scale, no residual) -> brought to
    ``output_size`` x ``output_size`` (:func:`resize_map`) -> ``norm``. A map of fixed size
    (16x16 tokens of 2048 channels in Gemma 3n) whatever the input's size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        output_size: int = 16,
        expansion: float = 2.0,
        act: ActLayer = nn.GELU,
        norm: NormLayer | None = None,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.output_size = (output_size, output_size)
        exp = make_divisible(in_channels * expansion)
        self.ffn = UniversalInvertedBottleneck(
            in_channels, exp, out_channels, 0, 0, act=act, norm=norm, residual=False
        )
        self.norm = _norm(norm, out_channels)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        x = self.ffn(torch.cat(fuse_sizes(maps), dim=1))
        return self.norm(resize_map(x, self.output_size))
