"""Detector weights: torchvision's ``ssdlite320_mobilenet_v3_large`` and our own files.

torchvision's SSDLite keeps the backbone as ``backbone.features.0`` (up to and including
the C4 expansion) and ``backbone.features.1`` (the rest of that block, whose sub-modules
keep their indices 1..3, then the remaining layers), the extra layers as
``backbone.extra.<i>.<0|1|2>``, and the predictors as
``head.{classification,regression}_head.module_list.<i>.<0: depthwise conv-BN | 1: 1x1>``.
The layers are the same as ours, in the same order, with the same BatchNorm epsilon
(1e-3): loading only renames tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blocks import InvertedResidual
from ..errors import CheckpointError
from ..weights import (
    FORMAT,
    _conv_bn,
    _torchvision_block,
    fit_state_dict,
    read_state_dict,
)
from .model import DetectorConfig, SSDLite

__all__ = [
    "detect_detector_source",
    "detector_from_checkpoint",
    "infer_detector_classes",
    "load_detector_weights",
    "saved_detector_config",
]

StateDict = dict[str, torch.Tensor]
TORCHVISION_CLS_KEY = "head.classification_head.module_list.0.1.weight"
OURS_CLS_KEY = "classification.0.pw.weight"
TORCHVISION_BN_EPS = 1e-3


def detect_detector_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"mobilenet"`` (ours) or ``"torchvision"`` (an SSDLite state dict)."""
    if OURS_CLS_KEY in state_dict:
        return "mobilenet"
    if TORCHVISION_CLS_KEY in state_dict:
        return "torchvision"
    sample = ", ".join(list(state_dict)[:3])
    raise CheckpointError(
        f"not an SSDLite checkpoint (first keys: {sample}); expected one of this toolkit's "
        "detectors or torchvision's ssdlite320_mobilenet_v3_large"
    )


def infer_detector_classes(state_dict: Mapping[str, torch.Tensor], boxes: int = 6) -> int:
    """Number of classes (background included) of a detector checkpoint."""
    key = OURS_CLS_KEY if detect_detector_source(state_dict) == "mobilenet" else TORCHVISION_CLS_KEY
    return int(state_dict[key].shape[0]) // boxes


def saved_detector_config(metadata: Mapping[str, str]) -> DetectorConfig | None:
    """The detector config stored in our safetensors metadata (None for other files)."""
    if metadata.get("format") != FORMAT or "config" not in metadata:
        return None
    try:
        return DetectorConfig.from_dict(json.loads(metadata["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"not a detector config in the checkpoint metadata: {e}") from None


def _layer_key(prefix: str, rest: str, layer: nn.Module) -> str:
    if isinstance(layer, InvertedResidual):
        return _torchvision_block(prefix, rest, layer)
    return _conv_bn(prefix, rest)


def _from_torchvision(state_dict: StateDict, model: SSDLite) -> StateDict:
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
                new = prefix + m[2] if name == "se" else _conv_bn(prefix, m[2])
        elif m := re.fullmatch(r"backbone\.features\.1\.(\d+)\.(.+)", key):
            k = int(m[1])
            if k < len(tail):
                new = _layer_key(f"features.tail.{k}.", m[2], tail[k])
        elif m := re.fullmatch(r"backbone\.extra\.(\d+)\.([012])\.(.+)", key):
            name = ("reduce", "dw", "expand")[int(m[2])]
            new = _conv_bn(f"features.extras.{m[1]}.{name}.", m[3])
        elif m := re.fullmatch(
            r"head\.(classification|regression)_head\.module_list\.(\d+)\.([01])\.(.+)", key
        ):
            prefix = f"{m[1]}.{m[2]}."
            new = _conv_bn(prefix + "dw.", m[4]) if m[3] == "0" else f"{prefix}pw.{m[4]}"
        out[new] = tensor
    return out


def load_detector_weights(
    model: SSDLite,
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    source_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Load a detector checkpoint into ``model`` in place; returns the detected source.

    Refuses, before copying anything, a checkpoint that does not fit (naming the missing,
    unexpected and mis-shaped tensors) or one of ours saved from another model.
    """
    state_dict, metadata, name = read_state_dict(checkpoint, source_name, metadata)
    source = detect_detector_source(state_dict)
    fit_state_dict(
        model, state_dict, name, source, saved_detector_config(metadata), TORCHVISION_BN_EPS,
        _from_torchvision,
    )  # fmt: skip
    return source


def detector_from_checkpoint(
    name: str,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str],
    source_name: str = "checkpoint",
    **kwargs: Any,
) -> SSDLite:
    """Build detector ``name`` to fit a checkpoint already read, and load it.

    Our own files supply their whole config (width, classes, input size,
    post-processing) as defaults; for torchvision's the number of classes is read from
    the classification head. ``kwargs`` override both.
    """
    from ..models.registry import create_model

    saved = saved_detector_config(metadata)
    if saved is not None and saved.name == name:
        kwargs = {**{k: v for k, v in saved.to_dict().items() if k != "name"}, **kwargs}
    kwargs.setdefault("num_classes", infer_detector_classes(state_dict))
    model = create_model(name, **kwargs)
    load_detector_weights(model, state_dict, source_name=source_name, metadata=metadata)
    return model
