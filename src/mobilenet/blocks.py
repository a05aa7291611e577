"""The two building blocks of the MobileNet family.

* :class:`DepthwiseSeparable` - MobileNetV1 (V1 Section 3.1, Figure 3): a 3x3 depthwise
  conv and a 1x1 pointwise conv, each followed by BatchNorm and ReLU6.
* :class:`InvertedResidual` - MobileNetV2's bottleneck (V2 Table 1), which MobileNetV3
  reuses with squeeze-excite, 5x5 kernels and h-swish (V3 Section 5): one class for both.

Every block records ``stride``; a block with stride 2 starts a new stage (a new output
stride), which is how detection backbones and the memory-efficient executor find their
feature levels without special cases. In an atrous backbone (:mod:`mobilenet.models.atrous`)
a block that gives up its stride records stride 1 and a ``dilation`` instead, so the
feature levels it reports are the strides it really has.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import ActLayer, ConvBNAct, ResidualAdd, SqueezeExcite, make_divisible

__all__ = ["DepthwiseSeparable", "InvertedResidual"]


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 layer: ``dw`` 3x3 depthwise (stride s) -> ``pw`` 1x1, both BN + ReLU6.

    Cost (V1 Section 3.1): ``Dk*Dk*M*Df*Df + M*N*Df*Df`` MAdds instead of
    ``Dk*Dk*M*N*Df*Df`` for a full convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels
        self.dw = ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pw = ConvBNAct(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (V2 Table 1; V3 Figure 4).

    ``expand`` 1x1 (k -> exp, BN, act; absent when ``exp == in``) -> ``dw`` kxk depthwise
    (stride s, BN, act) -> ``se`` squeeze-excite (V3 only) -> ``project`` 1x1 (exp -> k',
    BN, no activation: the linear bottleneck). The input is added back only when the
    stride is 1 and ``in == out``: no projection shortcut, no activation after the add.
    ``dilation`` > 1 makes the depthwise conv atrous (DeepLab; V2 Section 6.3, V3 Section
    6.4); the 1x1 convs are unaffected.
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
            exp_channels, exp_channels, kernel_size, stride, exp_channels, act, dilation
        )
        # V3 Section 5.3: SE squeezes to 1/4 of the expansion, rounded to a multiple of 8.
        if use_se:
            self.se = SqueezeExcite(exp_channels, make_divisible(exp_channels / 4))
        else:
            self.se = nn.Identity()
        # pw-linear
        self.project = ConvBNAct(exp_channels, out_channels, 1, act=None)
        self.add = ResidualAdd() if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        if self.add is not None:
            out = self.add(x, out)
        return out
