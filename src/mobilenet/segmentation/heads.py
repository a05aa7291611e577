"""Segmentation heads: LR-ASPP (V3 Section 6.4), DeepLabv3's ASPP (V2 Section 6.3) and the
auxiliary FCN head torchvision trains DeepLabv3 with.

Every head takes the backbone's taps by name: ``"high"`` (the last layer, at the model's
output stride) and ``"low"`` (the first layer at output stride 8). Their BatchNorm
epsilon is PyTorch's 1e-5, as in torchvision's heads and the TF DeepLab reference (the
backbone keeps its own); their outputs are logits at the resolution of the taps, which
the model upsamples to the input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvBNAct

__all__ = ["ASPP", "HEAD_BN_EPS", "DeepLabHead", "FCNHead", "LRASPPHead", "Taps"]

HEAD_BN_EPS = 1e-5
ASPP_CHANNELS = 256  # DeepLabv3 (Chen et al. 2017, Section 3.3): 256 filters per branch
Taps = dict[str, torch.Tensor]


def resize(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear resize to ``size`` (height, width), ``align_corners=False`` as torchvision."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class LRASPPHead(nn.Module):
    """Lite R-ASPP (V3 Section 6.4, Figure 10).

    ``branch``: 1x1 conv to ``channels`` (F = 128) + BN + ReLU on the high features,
    multiplied by ``gate``: global average pool -> 1x1 conv -> sigmoid (the paper pools
    with a 49x49 kernel and stride (16, 20) at 1024x2048; torchvision and this head pool
    the whole map, so any input size works). The product is upsampled to the low
    features' size (output stride 8) and classified by a 1x1 conv, plus a 1x1 classifier
    on the low features: the two logits are summed.
    """

    def __init__(
        self, low_channels: int, high_channels: int, num_classes: int, channels: int = 128
    ) -> None:
        super().__init__()
        self.branch = ConvBNAct(high_channels, channels, 1, act=nn.ReLU)
        self.gate = nn.Conv2d(high_channels, channels, 1, bias=False)
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, taps: Taps) -> torch.Tensor:
        low, high = taps["low"], taps["high"]
        scale = torch.sigmoid(self.gate(high.mean((2, 3), keepdim=True)))
        x = resize(self.branch(high) * scale, low.shape[-2:])
        return self.low_classifier(low) + self.high_classifier(x)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabv3, Section 3.3), with BatchNorm and ReLU.

    ``branches``: a 1x1 conv and a 3x3 conv at each atrous rate; ``image_pool``: a 1x1
    conv on the globally pooled features, broadcast back to the map (image-level
    features). The branches are concatenated in torchvision's order (1x1, rates, pool) and
    ``project``-ed by a 1x1 conv, then dropout. No rates leaves the mobile configuration
    of V2 Section 6.3: the 1x1 branch and image pooling only.
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int] = (12, 24, 36),
        channels: int = ASPP_CHANNELS,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.rates = tuple(rates)
        branches = [ConvBNAct(in_channels, channels, 1, act=nn.ReLU)]
        for rate in self.rates:
            branches.append(ConvBNAct(in_channels, channels, 3, act=nn.ReLU, dilation=rate))
        self.branches = nn.ModuleList(branches)
        self.image_pool = ConvBNAct(in_channels, channels, 1, act=nn.ReLU)
        self.project = ConvBNAct(channels * (len(branches) + 1), channels, 1, act=nn.ReLU)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        # bilinear upsampling of a 1x1 map (DeepLab, torchvision) is a broadcast
        outs.append(self.image_pool(x.mean((2, 3), keepdim=True)).expand_as(outs[0]))
        return self.dropout(self.project(torch.cat(outs, 1)))


class DeepLabHead(nn.Module):
    """DeepLabv3's head on the high features: ASPP -> [3x3 conv-BN-ReLU] -> 1x1 classifier.

    ``refine``: torchvision's ``DeepLabHead`` adds a 3x3 conv (256 channels) between ASPP
    and the classifier; the DeepLabv3 paper and its TF reference (V2 Section 6.3) do not.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rates: Sequence[int] = (12, 24, 36),
        refine: bool = True,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, rates, dropout=dropout)
        if refine:
            self.refine: nn.Module = ConvBNAct(ASPP_CHANNELS, ASPP_CHANNELS, 3, act=nn.ReLU)
        else:
            self.refine = nn.Identity()
        self.classifier = nn.Conv2d(ASPP_CHANNELS, num_classes, 1)

    def forward(self, taps: Taps) -> torch.Tensor:
        return self.classifier(self.refine(self.aspp(taps["high"])))


class FCNHead(nn.Module):
    """torchvision's auxiliary head (``FCNHead``) on the low features, for the auxiliary
    loss of training: 3x3 conv to a quarter of the channels + BN + ReLU, dropout 0.1,
    1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNAct(in_channels, in_channels // 4, 3, act=nn.ReLU)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(in_channels // 4, num_classes, 1)

    def forward(self, taps: Taps) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(taps["low"])))
