"""The checkpoint layouts SSDLite reads: ours and torchvision's ``ssdlite320_mobilenet_v3_large``.

torchvision's SSDLite keeps the backbone as ``backbone.features.0`` (up to and including
the C4 expansion) and ``backbone.features.1`` (the rest of that block, whose sub-modules
keep their indices 1..3, then the remaining layers), the extra layers as
``backbone.extra.<i>.<0|1|2>``, and the predictors as
``head.{classification,regression}_head.module_list.<i>.<0: depthwise conv-BN | 1: 1x1>``.
The layers are the same as ours, in the same order, with the same BatchNorm epsilon
(1e-3): loading only renames tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..blocks import InvertedResidual
from ..models.layouts import conv_bn_key, torchvision_block_key
from ..weights import FORMAT, Layout, register_layout
from .model import SSDLite

__all__ = ["BOXES_PER_LOCATION"]

StateDict = dict[str, torch.Tensor]
TORCHVISION_CLS_KEY = "head.classification_head.module_list.0.1.weight"
OURS_CLS_KEY = "classification.0.pw.weight"
TORCHVISION_BN_EPS = 1e-3
BOXES_PER_LOCATION = 6  # default boxes per location of the first map (its head's rows / 6)


def _layer_key(prefix: str, rest: str, layer: nn.Module) -> str:
    if isinstance(layer, InvertedResidual):
        return torchvision_block_key(prefix, rest, layer)
    return conv_bn_key(prefix, rest)


def _from_torchvision(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, SSDLite)
    body, tail = model.features.body, model.features.tail
    c4_rest = tail[0]  # (dw, se, project) of the first stride-32 block
    # torchvision's indices inside that block: expand, dw, [se], project
    parts = ["expand", "dw"] + (["se"] if not isinstance(c4_rest[1], nn.Identity) else [])
    parts.append("project")
    position = {"dw": 0, "se": 1, "project": 2}
    out: StateDict = {}
    for key, tensor in state_dict.items():
        new = key
        if m := re.fullmatch(r"backbone\.features\.0\.(\d+)\.(.+)", key):
            i = int(m[1])
            if i < len(body):
                new = _layer_key(f"features.body.{i}.", m[2], body[i])
        elif m := re.fullmatch(r"backbone\.features\.1\.0\.(\d+)\.(.+)", key):
            j = int(m[1])
            if j < len(parts):
                name, prefix = parts[j], f"features.tail.0.{position[parts[j]]}."
                new = prefix + m[2] if name == "se" else conv_bn_key(prefix, m[2])
        elif m := re.fullmatch(r"backbone\.features\.1\.(\d+)\.(.+)", key):
            k = int(m[1])
            if k < len(tail):
                new = _layer_key(f"features.tail.{k}.", m[2], tail[k])
        elif m := re.fullmatch(r"backbone\.extra\.(\d+)\.([012])\.(.+)", key):
            name = ("reduce", "dw", "expand")[int(m[2])]
            new = conv_bn_key(f"features.extras.{m[1]}.{name}.", m[3])
        elif m := re.fullmatch(
            r"head\.(classification|regression)_head\.module_list\.(\d+)\.([01])\.(.+)", key
        ):
            prefix = f"{m[1]}.{m[2]}."
            new = conv_bn_key(prefix + "dw.", m[4]) if m[3] == "0" else f"{prefix}pw.{m[4]}"
        out[new] = tensor
    return out


def _classes(key: str):
    def num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
        """Classes, the background included: the first head's rows per default box."""
        return int(state_dict[key].shape[0]) // BOXES_PER_LOCATION

    return num_classes


register_layout(
    Layout(
        FORMAT,
        SSDLite,
        matches=lambda sd: OURS_CLS_KEY in sd,
        num_classes=_classes(OURS_CLS_KEY),
    )
)
register_layout(
    Layout(
        "torchvision",
        SSDLite,
        matches=lambda sd: TORCHVISION_CLS_KEY in sd,
        num_classes=_classes(TORCHVISION_CLS_KEY),
        translate=_from_torchvision,
        bn_eps=lambda sd: TORCHVISION_BN_EPS,
    )
)
