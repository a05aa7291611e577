"""Layers shared by every MobileNet: conv-BN-activation, squeeze-excite, residual add.

BatchNorm defaults follow the TensorFlow reference implementations of the papers
(epsilon 1e-3, moving-average decay 0.99, i.e. PyTorch momentum 0.01). A model carries
its own ``bn_eps``: checkpoints trained with another epsilon (torchvision's V2 and timm's
models use PyTorch's 1e-5) set it when they are loaded, so their outputs are reproduced
exactly.

Padding: ``"symmetric"`` (PyTorch's, ``dilation * (kernel // 2)`` on every side: torchvision,
timm) or ``"same"`` (TensorFlow's SAME, which the papers' authors trained with: as many
outputs as ``ceil(size / stride)``, the extra pixel of an odd total after the input). With
stride 1 the two coincide; with stride 2 on an even input SAME pads 0 before and 1 after a
3x3 kernel (1 and 2 for 5x5), on an odd one 1 and 1 (2 and 2), so it is computed from the
input's size in ``forward``. ``"keras"`` is SAME as computed for a size divisible by the
stride, whatever the input: the fixed ``ZeroPadding2D(((0, 1), (0, 1)))`` that Keras'
MobileNet (V1) puts before its stride-2 depthwise convolutions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from .errors import MobileNetError

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "PADDINGS",
    "ActLayer",
    "AntiAlias",
    "BlurPool2d",
    "ConvBNAct",
    "DotProductAttention",
    "DropPath",
    "GELUTanh",
    "LayerScale",
    "NormLayer",
    "ResidualAdd",
    "RmsNorm2d",
    "SamePad",
    "SqueezeExcite",
    "avg_pool_aa",
    "make_divisible",
    "same_padding",
    "set_bn_eps",
]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
PADDINGS = ("symmetric", "same", "keras")

ActLayer = Callable[[], nn.Module]
"""A zero-argument factory of an activation module, e.g. ``nn.ReLU6`` or ``nn.Hardswish``.

h-swish (V3 Section 5.2) is ``x * ReLU6(x + 3) / 6`` and h-sigmoid is ``ReLU6(x + 3) / 6``:
PyTorch's ``nn.Hardswish`` and ``nn.Hardsigmoid`` compute exactly these, with fused kernels
and standard ONNX and quantized counterparts, so the toolkit uses them directly.
"""


NormLayer = Callable[[int], nn.Module]
"""A factory of a normalisation layer over ``channels``: BatchNorm (the default of every
block, V1-V4) or :class:`RmsNorm2d` (MobileNetV5)."""


class GELUTanh(nn.GELU):
    """GELU with the tanh approximation, ``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715
    x^3)))``: MobileNetV5's activation (timm's ``nn.GELU(approximate="tanh")``)."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


class RmsNorm2d(nn.Module):
    """RMS normalisation of each pixel over its channels (MobileNetV5, timm's
    ``RmsNorm2d``): ``x / sqrt(mean_c(x^2) + eps) * weight``, no mean subtracted, no bias,
    no running statistics, so it behaves alike in training and eval and at batch one.
    ``eps`` 1e-6 is timm's; the operations are timm's, in its order, so outputs agree to
    the last bit."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps:g}"


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``.

    The rule of the TensorFlow reference code, used by torchvision and timm alike: never
    below ``min_value`` (default ``divisor``) and never more than 10% below ``value``.
    This is how the width multiplier alpha turns a paper channel count ``c`` into
    ``make_divisible(c * alpha)``.
    """
    if min_value is None:
        min_value = divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding of one side of ``size``: (before, after).

    ``ceil(size / stride)`` outputs; the padding they need, split evenly with the odd
    pixel after the input.
    """
    span = (kernel - 1) * dilation + 1
    total = max((-(-size // stride) - 1) * stride + span - size, 0)
    return total // 2, total - total // 2


class SamePad(nn.Module):
    """Zero padding as TensorFlow's SAME computes it, from the input's size (timm's
    ``pad_same``): exact at any size, and traced into ONNX at the exported size."""

    def __init__(self, kernel_size: int, stride: int, dilation: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, same_pad(x.shape, self.kernel_size, self.stride, self.dilation))


def same_pad(
    shape: torch.Size, kernel: int, stride: int, dilation: int = 1
) -> tuple[int, int, int, int]:
    """``F.pad``'s (left, right, top, bottom) for TF's SAME padding of an NCHW ``shape``."""
    top, bottom = same_padding(shape[-2], kernel, stride, dilation)
    left, right = same_padding(shape[-1], kernel, stride, dilation)
    return left, right, top, bottom


# One call in an FX graph (the cost model's, FX quantization's): symbolic tracing cannot
# branch on a size it does not know, and the padding depends on the input's size.
torch.fx.wrap("same_pad")


AntiAlias = Callable[[int, int], nn.Module]
"""A factory ``(channels, stride) -> module`` of an anti-aliased downsampler, which a strided
:class:`ConvBNAct` applies after its activation, its conv then running at stride 1 (timm's
``aa_layer``): :func:`avg_pool_aa` or :class:`BlurPool2d`."""


def avg_pool_aa(channels: int, stride: int) -> nn.Module:
    """Average pooling as the downsampler (timm's ``aa_layer="avg"``): ``stride x stride``
    windows, no padding (an odd side drops its last row: ``nn.AvgPool2d`` floors)."""
    return nn.AvgPool2d(stride)


class BlurPool2d(nn.Module):
    """Blur, then subsample (Zhang, ICML 2019, "Making Convolutional Networks Shift-Invariant
    Again"): a fixed binomial low-pass filter (``filt_size`` 3: ``[1, 2, 1] / 4`` along each
    axis) applied per channel at ``stride``, so a strided layer aliases less.

    As timm's ``BlurPool2d``: ``((stride - 1) + (filt_size - 1)) // 2`` pixels of padding on
    every side, mirrored (``pad_mode="reflect"``, its default) or zeros (``"constant"``,
    timm's ``aa_layer="blurpc"``), then the filter at ``stride``. The binomial filter of
    ``n`` taps is ``n - 1`` two-tap box filters in a row (``[1, 2, 1] / 4 = [1, 1] / 2 *
    [1, 1] / 2``), so it runs as 2x2 average pools, the last one strided: no weights, no
    buffer (a model with it reads the same checkpoints as one without), and ops that
    every exporter and int8 backend has. Against timm's depthwise conv the sums differ in
    order only (~1e-7 relative).
    """

    def __init__(
        self, channels: int, stride: int = 2, filt_size: int = 3, pad_mode: str = "reflect"
    ) -> None:
        super().__init__()
        if filt_size < 2:
            raise MobileNetError(f"a blur filter has at least 2 taps, got {filt_size}")
        self.channels, self.stride, self.pad_mode = channels, stride, pad_mode
        self.filt_size = filt_size
        self.padding = ((stride - 1) + (filt_size - 1)) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.padding,) * 4, mode=self.pad_mode)
        for _ in range(self.filt_size - 2):
            x = F.avg_pool2d(x, 2, 1)
        return F.avg_pool2d(x, 2, self.stride)

    def extra_repr(self) -> str:
        return f"{self.channels}, stride={self.stride}, pad_mode={self.pad_mode!r}"


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; ``act=None`` leaves it linear.

    ``groups == in_channels == out_channels`` makes it a depthwise convolution.
    ``padding`` (see the module docstring): ``"symmetric"`` pads ``dilation * (kernel_size
    // 2)`` on every side, as in torchvision and timm: a stride-1 conv keeps the map's size,
    dilated (atrous) or not. ``"same"`` is TensorFlow's SAME: static and symmetric where it
    does not depend on the input's size (stride 1), a :class:`SamePad` before an unpadded
    conv where it does. ``"keras"``: Keras' fixed padding of a stride-2 conv.
    ``bias`` gives the conv a bias (MobileNetV5's stem); ``norm`` replaces the BatchNorm
    (:data:`NormLayer`, e.g. :class:`RmsNorm2d`), still under the name ``bn``.
    ``aa`` (:data:`AntiAlias`, timm's ``aa_layer``): a strided conv runs at stride 1 and
    this downsampler strides after the activation; None, the default, adds no module.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: ActLayer | None = nn.ReLU6,
        dilation: int = 1,
        padding: str = "symmetric",
        bias: bool = False,
        norm: NormLayer | None = None,
        aa: AntiAlias | None = None,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        use_aa = aa is not None and stride > 1  # the conv runs at stride 1, the aa strides
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=1 if use_aa else stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=bias,
        )
        self.pad: nn.Module | None = None
        self.padding = "symmetric"
        self.set_padding(padding)
        if norm is not None:
            self.bn: nn.Module = norm(out_channels)
        else:
            self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = act() if act is not None else nn.Identity()
        self.aa: nn.Module | None = aa(out_channels, stride) if use_aa and aa else None

    def set_padding(self, padding: str) -> None:
        """Switch between the paddings of :data:`PADDINGS`; the weights are the same."""
        if padding not in PADDINGS:
            raise MobileNetError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        k, s, d = self.conv.kernel_size[0], self.conv.stride[0], self.conv.dilation[0]
        self.padding, self.pad = padding, None
        if padding == "symmetric" or (s == 1 and (k - 1) * d % 2 == 0):
            self.conv.padding = (d * (k // 2),) * 2  # SAME at stride 1 is this too
        elif padding == "same":
            self.conv.padding, self.pad = (0, 0), SamePad(k, s, d)
        else:  # "keras": SAME as for a size divisible by the stride, whatever the size
            before, after = same_padding(s, k, s, d)
            self.conv.padding, self.pad = (0, 0), nn.ZeroPad2d((before, after, before, after))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        x = self.act(self.bn(self.conv(x)))
        if self.aa is not None:
            x = self.aa(x)
        return x


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite as MobileNetV3 uses it (V3 Section 5.3, Figure 4).

    Global average pool -> 1x1 conv to ``squeeze_channels`` -> ReLU -> 1x1 conv back to
    ``channels`` -> h-sigmoid -> channel-wise scale of the input.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        scale = self.gate(self.fc2(self.act(self.fc1(scale))))
        return x * scale


class ResidualAdd(nn.Module):
    """``shortcut + residual`` as a module, so quantization can swap the op in one place."""

    def forward(self, shortcut: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return shortcut + residual


# One call in an FX graph traced in training mode, as in torchvision's own module: its
# body branches on the input's shape, which symbolic tracing does not know.
torch.fx.wrap("stochastic_depth")


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., ECCV 2016) on a residual branch, per sample: in
    training each sample's whole branch is zeroed with probability ``p`` and the kept ones
    are scaled by ``1 / (1 - p)``, so the expected sum with the shortcut is unchanged; the
    identity in eval mode or when ``p`` is 0. The blocks apply it to the branch before
    their :class:`ResidualAdd`, never to the shortcut. torchvision's
    ``stochastic_depth(mode="row")`` computes it (the TF reference's ``StochasticDepth``
    layer does the same per sample)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise MobileNetError(f"drop path rate must be in [0, 1), got {p!r}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:  # no graph node at all in eval
            return x
        return stochastic_depth(x, self.p, mode="row", training=self.training)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def set_bn_eps(model: nn.Module, eps: float) -> None:
    """Set the epsilon of every BatchNorm layer (running statistics depend on it)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = eps


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (MobileNetV4 Section 4: the hybrid
    models' UIB and Mobile MQA blocks), ``x * gamma`` with ``gamma`` initialised small
    (1e-5 in the reference) so every block starts close to the identity."""

    def __init__(self, channels: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class DotProductAttention(nn.Module):
    """``softmax(Q K^T / sqrt(d)) V`` as a module (MobileNetV4 Section 4.2), so the cost
    model counts its two matrix products (``Q K^T`` and ``A V``) as a layer of type
    ``attention``. PyTorch's fused kernel computes it, as timm's attention does, so
    outputs agree with timm's to the last bit; keys and values broadcast over the query
    heads (multi-query attention: one shared key/value head)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)
