"""Layers shared by every MobileNet: conv-BN-activation, squeeze-excite, residual add.

BatchNorm defaults follow the TensorFlow reference implementations of the papers
(epsilon 1e-3, moving-average decay 0.99, i.e. PyTorch momentum 0.01). A model carries
its own ``bn_eps``: checkpoints trained with another epsilon (torchvision's V2 and timm's
models use PyTorch's 1e-5) set it when they are loaded, so their outputs are reproduced
exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "ActLayer",
    "ConvBNAct",
    "DotProductAttention",
    "LayerScale",
    "ResidualAdd",
    "SqueezeExcite",
    "make_divisible",
    "set_bn_eps",
]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

ActLayer = Callable[[], nn.Module]
"""A zero-argument factory of an activation module, e.g. ``nn.ReLU6`` or ``nn.Hardswish``.

h-swish (V3 Section 5.2) is ``x * ReLU6(x + 3) / 6`` and h-sigmoid is ``ReLU6(x + 3) / 6``:
PyTorch's ``nn.Hardswish`` and ``nn.Hardsigmoid`` compute exactly these, with fused kernels
and standard ONNX and quantized counterparts, so the toolkit uses them directly.
"""


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


class ConvBNAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> activation; ``act=None`` leaves it linear.

    ``groups == in_channels == out_channels`` makes it a depthwise convolution. Padding is
    ``dilation * (kernel_size // 2)`` on every side, as in torchvision and timm: a stride-1
    conv keeps the map's size, dilated (atrous) or not.
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
    ) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


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
