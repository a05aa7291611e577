"""The checkpoint layouts the segmentation models read: ours, and torchvision's
``lraspp_mobilenet_v3_large`` and ``deeplabv3_mobilenet_v3_large``.

torchvision keeps the backbone's layers as ``backbone.<i>`` (named as in its classifier's
``features.<i>``), LR-ASPP's head as ``classifier.{cbr.<0|1>, scale.1,
low_classifier, high_classifier}``, DeepLabv3's as ``classifier.0`` (ASPP:
``convs.<j>.<0|1>``, the pooling branch ``convs.<last>.<1|2>``, ``project.<0|1>``),
``classifier.<1|2>`` (the 3x3 conv and its BN) and ``classifier.4``, and the auxiliary
FCN head as ``aux_classifier.<0|1|4>``. The backbone trained with BatchNorm epsilon
1e-3, the heads with 1e-5, as ours. A checkpoint's auxiliary head is dropped when the
model has none: it only serves training.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..blocks import InvertedResidual
from ..models.layouts import conv_bn_key, torchvision_block_key
from ..weights import FORMAT, Layout, register_layout
from .heads import DeepLabHead
from .model import SegmentationModel

__all__: list[str] = []

StateDict = dict[str, torch.Tensor]
TORCHVISION_BN_EPS = 1e-3  # torchvision's MobileNetV3 backbone
TORCHVISION_CLASSIFIERS = ("classifier.low_classifier.weight", "classifier.4.weight")
OURS_CLASSIFIERS = ("head.low_classifier.weight", "head.classifier.weight")

# torchvision LR-ASPP and DeepLabv3 head names (after "classifier.") -> ours (after "head.")
_LRASPP = {"cbr.0": "branch.conv", "cbr.1": "branch.bn", "scale.1": "gate"}
_DEEPLAB = {"0.project.0": "aspp.project.conv", "0.project.1": "aspp.project.bn"}
_DEEPLAB |= {"1": "refine.conv", "2": "refine.bn", "4": "classifier"}
_FCN = {"0": "conv.conv", "1": "conv.bn", "4": "classifier"}


def _head_key(rest: str, head: nn.Module) -> str:
    """A key under torchvision's ``classifier.`` -> ours under ``head.``."""
    if isinstance(head, DeepLabHead) and (m := re.fullmatch(r"0\.convs\.(\d+)\.(\d+)\.(.+)", rest)):
        j, index, tail = int(m[1]), int(m[2]), m[3]
        if j < len(head.aspp.branches):
            return conv_bn_key(f"head.aspp.branches.{j}.", f"{index}.{tail}")
        # the pooling branch: [AdaptiveAvgPool2d, conv, bn, relu]
        return conv_bn_key("head.aspp.image_pool.", f"{index - 1}.{tail}")
    names = _DEEPLAB if isinstance(head, DeepLabHead) else _LRASPP
    for theirs, ours in names.items():
        if rest.startswith(theirs + "."):
            return f"head.{ours}.{rest.removeprefix(theirs + '.')}"
    return f"head.{rest}"


def _from_torchvision(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, SegmentationModel)
    out: StateDict = {}
    for key, tensor in state_dict.items():
        new = key
        if m := re.fullmatch(r"backbone\.(\d+)\.(.+)", key):
            i, rest = int(m[1]), m[2]
            if i < len(model.backbone):
                layer = model.backbone[i]
                if isinstance(layer, InvertedResidual):
                    new = torchvision_block_key(f"backbone.{i}.", rest, layer)
                else:
                    new = conv_bn_key(f"backbone.{i}.", rest)
        elif key.startswith("classifier."):
            new = _head_key(key.removeprefix("classifier."), model.head)
        elif key.startswith("aux_classifier."):
            if model.aux_head is None:
                continue
            index, _, tail = key.removeprefix("aux_classifier.").partition(".")
            new = f"aux_head.{_FCN.get(index, index)}.{tail}"
        out[new] = tensor
    return out


def _from_ours(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, SegmentationModel)
    if model.aux_head is not None:
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith("aux_head.")}


def _classes(*keys: str):
    def num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
        for key in keys:
            if key in state_dict:
                return int(state_dict[key].shape[0])
        return 0

    return num_classes


register_layout(
    Layout(
        FORMAT,
        SegmentationModel,
        matches=lambda sd: (
            "backbone.0.conv.weight" in sd and any(k in sd for k in OURS_CLASSIFIERS)
        ),
        num_classes=_classes(*OURS_CLASSIFIERS),
        translate=_from_ours,
    )
)
register_layout(
    Layout(
        "torchvision",
        SegmentationModel,
        matches=lambda sd: (
            "backbone.0.0.weight" in sd and any(k in sd for k in TORCHVISION_CLASSIFIERS)
        ),
        num_classes=_classes(*TORCHVISION_CLASSIFIERS),
        translate=_from_torchvision,
        bn_eps=lambda sd: TORCHVISION_BN_EPS,
    )
)
