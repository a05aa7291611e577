"""Semantic segmentation on atrous MobileNets: LR-ASPP (V3 Section 6.4) and mobile
DeepLabv3 (V2 Section 6.3).

Interface (torchvision's segmentation convention): ``model(x)`` takes a normalised batch
``[N, 3, H, W]`` (ImageNet mean and std, any H and W) and returns a dict: ``"out"``,
the class logits ``[N, num_classes, H, W]`` upsampled bilinearly to the input size, and
``"aux"`` (same shape) when the model was built with ``aux_loss=True``. One contract for
training (loss = CE(out) + 0.5 CE(aux), torchvision's recipe) and evaluation
(``["out"]``); torchvision's state dicts load and give the same dicts.

The backbone is an atrous MobileNet (output stride 16 by default; see
:mod:`mobilenet.models.atrous`) whose layers live in ``backbone``; the heads read two
taps of it: ``"high"``, its last layer, and ``"low"``, the first layer at output stride
8 (the block that starts that stage: torchvision's choice for both LR-ASPP's skip and
the auxiliary head). ``feature_info`` reports the backbone's strides.

Cost (``mobilenet.cost``; MAdds = multiply-adds of convs, the papers' convention):

=======================================  ==========  =======  ==============================
model (classes, input)                   params      MAdds    paper / reference
=======================================  ==========  =======  ==============================
lraspp_mobilenet_v3_large (21, 520)      3,221,538   2.086B   torchvision: 3,221,538, 2.086
deeplabv3_mobilenet_v3_large+aux (520)   11,029,328  10.452B  torchvision: 11,029,328, 10.452
deeplabv3_mobilenet_v2 (21, 512)         2,113,557   2.604B   V2 Table 7: 2.11M, 2.75B
deeplabv3_mobilenet_v2 (21, 513)         2,113,557   2.741B   (DeepLab evaluates at 513)
V3-Large RF2 LR-ASPP (19, 1024x2048)     1,746,878   9.915B   V3 Table 7: 1.51M, 9.74B
V3-Small RF2 LR-ASPP (19, 1024x2048)     515,614     2.832B   V3 Table 7: 0.47M, 2.90B
deeplabv3_mobilenet_v2 (19, 1024x2048)   2,113,043   20.83B   V3 Table 7 (R-ASPP): 21.29B
=======================================  ==========  =======  ==============================

RF2 here is torchvision's ``reduced_tail`` (the first stride-32 block keeps its 672 / 288
expansion). DeepLab's TF ``mobilenet_v3_*_seg`` also halves that expansion (336 / 144)
and takes LR-ASPP's skip from the expansion of the last stride-8 block (120 / 88
channels): that gives the papers' 1.51M / 0.47M params, with MAdds of 9.37B / 2.73B.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import MobileNetError
from ..layers import BN_EPS, set_bn_eps
from ..models import mobilenet_v2, mobilenet_v3
from ..models.atrous import check_output_stride
from ..models.base import IMAGENET_MEAN, IMAGENET_STD, feature_levels
from ..models.registry import check_width_mult, register_model
from .heads import HEAD_BN_EPS, DeepLabHead, FCNHead, LRASPPHead, Taps, resize

__all__ = [
    "SegmentationModel",
    "SegmenterConfig",
    "deeplabv3_mobilenet_v2",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_small",
]

LOW_STRIDE = 8  # the skip of LR-ASPP and the auxiliary head's input
Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything needed to rebuild a segmentation model; stored with its weights.

    ``num_classes`` counts the background (PASCAL VOC: 20 + 1 = 21; Cityscapes: 19).
    ``bn_eps`` is the backbone's (TF reference and torchvision V3: 1e-3); the heads use
    PyTorch's 1e-5 (``HEAD_BN_EPS``).
    """

    name: str
    width_mult: float = 1.0
    num_classes: int = 21
    output_stride: int = 16
    aux_loss: bool = False
    reduced_tail: bool = False
    bn_eps: float = BN_EPS
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SegmentationModel(nn.Module):
    """A backbone's layers, a head on its taps, and optionally an auxiliary head (see the
    module docstring for inputs and outputs)."""

    task = "segmentation"
    # Its forward returns a dict of maps; the main logits are under this key ("aux" serves
    # training only). Exporters and the memory-efficient executor take the model by it.
    main_output = "out"

    def __init__(
        self,
        features: list[nn.Module],
        head: nn.Module,
        config: SegmenterConfig,
        aux_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.backbone = nn.Sequential(*features)
        self.feature_info = feature_levels(self.backbone)
        self.taps = {low_tap(features): "low", len(features) - 1: "high"}
        self.head = head
        self.aux_head = aux_head
        for module in (head, aux_head):
            if module is not None:
                _init_head(module)
                set_bn_eps(module, HEAD_BN_EPS)
        set_bn_eps(self.backbone, config.bn_eps)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward_features(self, x: torch.Tensor) -> Taps:
        """The backbone's taps: ``{"low": ..., "high": ...}``."""
        taps: Taps = {}
        for index, layer in enumerate(self.backbone):
            x = layer(x)
            if index in self.taps:
                taps[self.taps[index]] = x
        return taps

    def forward(self, x: torch.Tensor) -> Outputs:
        taps = self.forward_features(x)
        size = x.shape[-2:]
        outputs = {"out": resize(self.head(taps), size)}
        if self.aux_head is not None:
            outputs["aux"] = resize(self.aux_head(taps), size)
        return outputs

    def set_bn_eps(self, eps: float) -> None:
        """Use the backbone BatchNorm epsilon a checkpoint was trained with."""
        set_bn_eps(self.backbone, eps)
        self.config = SegmenterConfig(**{**self.config.to_dict(), "bn_eps": eps})


def low_tap(features: list[nn.Module]) -> int:
    """Index of the first layer at output stride 8 (torchvision's ``stage_indices[-4]``)."""
    for info in feature_levels(features):
        if info.stride == LOW_STRIDE:
            return info.first
    raise MobileNetError(f"the backbone has no layer at output stride {LOW_STRIDE}")


def _init_head(head: nn.Module) -> None:
    """He-normal convs, unit BatchNorm: the backbone's initialisation."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _config(name: str, width_mult: float, num_classes: int, **kwargs: Any) -> SegmenterConfig:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise MobileNetError(f"a segmentation model needs num_classes >= 1, got {num_classes!r}")
    check_output_stride(kwargs.get("output_stride", 16))
    return SegmenterConfig(name, check_width_mult(width_mult), num_classes, **kwargs)


def _v3_features(spec: mobilenet_v3.Spec, config: SegmenterConfig) -> list[nn.Module]:
    """An atrous V3 in torchvision's convention (``dilated=True``, whose checkpoints load),
    with the last stage halved ("RF2", V3 Section 6.4) if ``config.reduced_tail``."""
    if config.reduced_tail:
        spec = mobilenet_v3.reduced_tail(spec)
    backbone = mobilenet_v3.build_v3(
        config.name, spec, config.width_mult, 0, 0.0, False, config.output_stride, True
    )
    return list(backbone.features)


def _lraspp(spec: mobilenet_v3.Spec, config: SegmenterConfig) -> SegmentationModel:
    features = _v3_features(spec, config)
    low = features[low_tap(features)].out_channels
    head = LRASPPHead(low, features[-1].out_channels, config.num_classes)
    return SegmentationModel(features, head, config)


@register_model(task="segmentation")
def lraspp_mobilenet_v3_large(
    width_mult: float = 1.0,
    num_classes: int = 21,
    output_stride: int = 16,
    reduced_tail: bool = False,
) -> SegmentationModel:
    """LR-ASPP on MobileNetV3-Large (V3 Section 6.4): torchvision's
    ``lraspp_mobilenet_v3_large``, 3,221,538 params at 21 classes; ``reduced_tail=True``
    is the paper's RF2 backbone (V3 Table 7: 1.51M params, 9.74B MAdds at 1024x2048)."""
    config = _config(
        "lraspp_mobilenet_v3_large",
        width_mult,
        num_classes,
        output_stride=output_stride,
        reduced_tail=reduced_tail,
    )
    return _lraspp(mobilenet_v3.V3_LARGE, config)


@register_model(task="segmentation")
def lraspp_mobilenet_v3_small(
    width_mult: float = 1.0,
    num_classes: int = 21,
    output_stride: int = 16,
    reduced_tail: bool = False,
) -> SegmentationModel:
    """LR-ASPP on MobileNetV3-Small (V3 Section 6.4), built as torchvision would;
    ``reduced_tail=True``: RF2 (V3 Table 7: 0.47M params, 2.90B MAdds at 1024x2048)."""
    config = _config(
        "lraspp_mobilenet_v3_small",
        width_mult,
        num_classes,
        output_stride=output_stride,
        reduced_tail=reduced_tail,
    )
    return _lraspp(mobilenet_v3.V3_SMALL, config)


@register_model(task="segmentation")
def deeplabv3_mobilenet_v3_large(
    width_mult: float = 1.0, num_classes: int = 21, output_stride: int = 16, aux_loss: bool = False
) -> SegmentationModel:
    """DeepLabv3 on MobileNetV3-Large: torchvision's ``deeplabv3_mobilenet_v3_large``
    (ASPP rates 12, 24, 36 and its 3x3 conv after ASPP on the last layer; with
    ``aux_loss`` the FCN head on the first stride-8 block)."""
    config = _config(
        "deeplabv3_mobilenet_v3_large",
        width_mult,
        num_classes,
        output_stride=output_stride,
        aux_loss=aux_loss,
    )
    features = _v3_features(mobilenet_v3.V3_LARGE, config)
    head = DeepLabHead(features[-1].out_channels, num_classes)
    return SegmentationModel(features, head, config, _aux_head(features, config))


@register_model(task="segmentation")
def deeplabv3_mobilenet_v2(
    width_mult: float = 1.0, num_classes: int = 21, output_stride: int = 16, aux_loss: bool = False
) -> SegmentationModel:
    """Mobile DeepLabv3 (V2 Section 6.3, Table 7's "MNet V2*, OS 16, no ASPP" row: 75.32
    mIOU on VOC, 2.11M params, 2.75B MAdds): the heads read the 320-channel layer (the
    1280-channel conv is dropped); no atrous rates, only the 1x1 branch and image pooling,
    then the classifier (the TF reference: no 3x3 conv, dropout 0.1)."""
    config = _config(
        "deeplabv3_mobilenet_v2",
        width_mult,
        num_classes,
        output_stride=output_stride,
        aux_loss=aux_loss,
    )
    backbone = mobilenet_v2.mobilenet_v2(width_mult, 0, 0.0, output_stride)
    features = list(backbone.features)[:-1]
    head = DeepLabHead(features[-1].out_channels, num_classes, (), refine=False, dropout=0.1)
    return SegmentationModel(features, head, config, _aux_head(features, config))


def _aux_head(features: list[nn.Module], config: SegmenterConfig) -> nn.Module | None:
    if not config.aux_loss:
        return None
    return FCNHead(features[low_tap(features)].out_channels, config.num_classes)
