"""MobileNetV1 (Howard et al., 2017, arXiv 1704.04861).

ImageNet results (V1 Tables 4, 6, 7; top-1 / million MAdds / million params):

=========================  ======  =====  ======
model                      top-1   MAdds  params
=========================  ======  =====  ======
conv MobileNet             71.7%   4866   29.3
1.0 MobileNet-224          70.6%    569    4.2
0.75 MobileNet-224         68.4%    325    2.6
0.5 MobileNet-224          63.7%    149    1.3
0.25 MobileNet-224         50.6%     41    0.5
1.0 MobileNet-192          69.1%    418    4.2
1.0 MobileNet-160          67.2%    290    4.2
1.0 MobileNet-128          64.4%    186    4.2
=========================  ======  =====  ======

The width multiplier alpha thins every layer to ``make_divisible(c * alpha)`` channels;
the resolution multiplier rho is just the input size (224, 192, 160, 128 or any size
>= 32): the network is fully convolutional up to the global pool.

``keras=True`` builds Keras' ``MobileNet`` (whose weights :mod:`.keras_layouts` reads): it
thins to ``int(c * alpha)`` channels (the same as ours at alpha 0.25, 0.5, 0.75 and 1),
pads the stem as TF's SAME and each stride-2 depthwise conv by a fixed
``ZeroPadding2D(((0, 1), (0, 1)))``, which is SAME only where the map's side is even.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from ..blocks import DepthwiseSeparable
from ..errors import MobileNetError
from ..layers import ConvBNAct, make_divisible
from .base import MobileNet, ModelConfig, check_drop_path_rate
from .padding import KERAS_EVAL, resolve_padding
from .registry import register_model

__all__ = ["V1_TABLE_1", "mobilenet_v1", "mobilenet_v1_conv"]


class Layer(NamedTuple):
    """One row of V1 Table 1: ``type`` is "conv" (full 3x3) or "dw" (dw 3x3 + pw 1x1)."""

    type: str
    stride: int
    out: int


# V1 Table 1: MobileNet body, 224x224x3 input. (The paper prints s2 for the last dw
# layer; its output stays 7x7, so the stride is 1, as in every reference implementation.)
V1_TABLE_1 = (
    Layer("conv", 2, 32),  # 112x112x32
    Layer("dw", 1, 64),  # 112x112x64
    Layer("dw", 2, 128),  # 56x56x128
    Layer("dw", 1, 128),  # 56x56x128
    Layer("dw", 2, 256),  # 28x28x256
    Layer("dw", 1, 256),  # 28x28x256
    Layer("dw", 2, 512),  # 14x14x512
    *[Layer("dw", 1, 512)] * 5,  # 5x, 14x14x512
    Layer("dw", 2, 1024),  # 7x7x1024
    Layer("dw", 1, 1024),  # 7x7x1024
)


def _build(
    name: str,
    depthwise: bool,
    width_mult: float,
    num_classes: int,
    dropout: float,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    # V1 has no residual connection for stochastic depth to drop: a rate would be ignored.
    if check_drop_path_rate(drop_path_rate) > 0:
        raise MobileNetError(
            f"{name} has no residual blocks for drop path: drop_path_rate must be 0, "
            f"got {drop_path_rate!r}"
        )
    padding = resolve_padding(padding, keras)
    layers: list[nn.Module] = []
    in_channels = 3
    for row in V1_TABLE_1:
        out = int(row.out * width_mult) if keras else make_divisible(row.out * width_mult)
        if row.type == "conv":
            layers.append(ConvBNAct(in_channels, out, 3, row.stride, padding=padding))
        elif depthwise:
            dw_padding = "keras" if keras else padding
            layers.append(DepthwiseSeparable(in_channels, out, row.stride, dw_padding))
        else:  # V1 Table 4: every depthwise separable layer as one full 3x3 convolution
            layers.append(ConvBNAct(in_channels, out, 3, row.stride, padding=padding))
        in_channels = out
    config = ModelConfig(name, width_mult, num_classes, dropout, padding=padding, keras=keras)
    return MobileNet(layers, config, eval_config=KERAS_EVAL if keras else None)


@register_model
def mobilenet_v1(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.001,
    padding: str | None = None,
    keras: bool = False,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """MobileNetV1 (V1 Table 1): 4,231,976 params and 568.7M MAdds at 1.0-224.

    Dropout 0.001 is the reference TF-Slim model's ``dropout_keep_prob=0.999``.
    ``padding``: "symmetric" (default) or "same" (TF's); ``keras``: Keras' build.
    ``drop_path_rate``: 0 only (V1 has no residual blocks).
    """
    return _build(
        "mobilenet_v1", True, width_mult, num_classes, dropout, padding, keras, drop_path_rate
    )


@register_model
def mobilenet_v1_conv(
    width_mult: float = 1.0,
    num_classes: int = 1000,
    dropout: float = 0.001,
    padding: str | None = None,
    drop_path_rate: float = 0.0,
) -> MobileNet:
    """V1 with full 3x3 convolutions instead of depthwise separable ones (V1 Table 4)."""
    return _build(
        "mobilenet_v1_conv", False, width_mult, num_classes, dropout, padding, False, drop_path_rate
    )
