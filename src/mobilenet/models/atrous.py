"""Atrous (dilated) backbones: MobileNets at output stride 8, 16 or 32.

Dense prediction wants feature maps finer than a classifier's 1/32 (V2 Section 6.3, V3
Section 6.4, after DeepLab): once the product of the strides reaches the wanted output
stride, a layer that would stride keeps stride 1, and the depthwise convolutions after it
are dilated by the stride given up (rate 2, then 4 for a second stage), so every kernel
still sees the receptive field it was trained with. Parameters do not change: a
classifier's weights load into its atrous version.

Two conventions differ only in the block that gives up its stride:

* **DeepLab** (the TF reference of both papers, and timm's ``output_stride``): that block
  keeps the rate before it; the blocks after it are dilated. "OS 16: the last stride-2
  stage keeps stride 1 and the convs after it use dilation 2."
* **torchvision** (``mobilenet_v3_large(dilated=True)``, the backbone of its LR-ASPP and
  DeepLabV3 checkpoints): that block is dilated too (``whole_stage=True``).

Cost: a dilated conv costs its k*k taps at every output position, as any conv; a stage
kept at half the stride computes 4x the positions, so it costs 4x the MAdds.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MobileNetError

__all__ = ["OUTPUT_STRIDES", "atrous_layout", "check_output_stride"]

OUTPUT_STRIDES = (8, 16, 32)  # 32: a classifier's own; 16 and 8: DeepLab's atrous settings


def check_output_stride(output_stride: object) -> int:
    """An output stride a MobileNet can have: 8, 16 or 32."""
    if (
        not isinstance(output_stride, int)
        or isinstance(output_stride, bool)
        or output_stride not in OUTPUT_STRIDES
    ):
        raise MobileNetError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    return output_stride


def atrous_layout(
    strides: Sequence[int], output_stride: int = 32, whole_stage: bool = False
) -> list[tuple[int, int]]:
    """Each layer's ``(stride, dilation)`` for a network whose layers stride by ``strides``
    and that stops downsampling at ``output_stride``.

    ``whole_stage``: dilate the layer that gives up its stride too (torchvision's
    convention); otherwise it keeps the previous rate (DeepLab's and timm's).

    >>> atrous_layout([2, 2, 2, 2, 1, 2, 1], output_stride=8)
    [(2, 1), (2, 1), (2, 1), (1, 1), (1, 2), (1, 2), (1, 4)]
    >>> atrous_layout([2, 2, 2, 2, 1, 2, 1], output_stride=8, whole_stage=True)
    [(2, 1), (2, 1), (2, 1), (1, 2), (1, 2), (1, 4), (1, 4)]
    """
    check_output_stride(output_stride)
    layout: list[tuple[int, int]] = []
    reached, rate = 1, 1
    for stride in strides:
        if stride > 1 and reached * stride > output_stride:
            layout.append((1, rate * stride if whole_stage else rate))
            rate *= stride
        else:
            reached *= stride
            layout.append((stride, rate))
    return layout
