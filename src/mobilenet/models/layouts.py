"""The checkpoint layouts the MobileNet classifiers (V1, V2, V3) read.

* ours: the safetensors :func:`mobilenet.save_weights` writes (names as in our modules);
* torchvision: ``mobilenet_v2``, ``mobilenet_v3_large``, ``mobilenet_v3_small`` state
  dicts (the ``.pth`` files torchvision downloads, or ``model.state_dict()``);
* timm: ``mobilenetv1_{100,125}``, ``mobilenetv2_{035,050,075,100,140}``, the
  depth-scaled ``mobilenetv2_{110d,120d}`` and ``mobilenetv3_large_150d``,
  ``mobilenetv3_large_{075,100}``, ``mobilenetv3_small_{050,075,100}`` (``.pth``, ``.bin``
  or the hub's ``model.safetensors``, or a timm training checkpoint), and the authors' TF
  checkpoints timm ported: ``tf_mobilenetv3_{large,small}_{075,100}``,
  ``tf_mobilenetv3_{large,small}_minimal_100``.

Each source trained with its own BatchNorm epsilon (torchvision's V3: 1e-3; torchvision's
V2 and timm: PyTorch's default 1e-5; timm's ``tf_*``: TF's 1e-3) and padding (TF "SAME"
for ``tf_*``, PyTorch's symmetric padding for the rest); the layout says which, so outputs
match exactly. A timm MobileNetV3 state dict has the same tensors whether it is
``mobilenetv3_*`` or ``tf_*``: the caller's ``origin`` (``"timm:tf_mobilenetv3_large_075"``)
or a timm model name in the file's path tells them apart; else only where one of the two
exists at that size and width (``tf_mobilenetv3_large_minimal_100``,
``mobilenetv3_small_050``). Any other is refused in one line rather than loaded with a
padding it may not have been trained with.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..blocks import DepthwiseSeparable, InvertedResidual
from ..errors import CheckpointError
from ..layers import ConvBNAct
from ..weights import FORMAT, Layout, register_layout, saved_config
from .base import MobileNet
from .padding import TF_PREPROCESS

__all__ = [
    "TIMM_V3_DEEP_MODELS",
    "TIMM_V3_MODELS",
    "conv_bn_key",
    "timm_v3_model",
    "torchvision_block_key",
]

StateDict = dict[str, torch.Tensor]
PYTORCH_BN_EPS = 1e-5
TORCHVISION_V3_BN_EPS = 1e-3
TF_BN_EPS = 1e-3
# Inputs scaled to [-1, 1] (TF "inception" preprocessing), as the authors' checkpoints expect.
# timm's MobileNetV3 classifiers of the paper's tables (timm 1.0); tf_*: the authors' TF
# checkpoints, ported with TF's padding and BatchNorm epsilon.
TIMM_V3_MODELS = (
    "mobilenetv3_large_075",
    "mobilenetv3_large_100",
    "mobilenetv3_small_050",
    "mobilenetv3_small_075",
    "mobilenetv3_small_100",
    "tf_mobilenetv3_large_075",
    "tf_mobilenetv3_large_100",
    "tf_mobilenetv3_large_minimal_100",
    "tf_mobilenetv3_small_075",
    "tf_mobilenetv3_small_100",
    "tf_mobilenetv3_small_minimal_100",
)
# timm's depth-scaled MobileNetV3 (mobilenet_v3_large_150d): PyTorch padding only.
TIMM_V3_DEEP_MODELS = ("mobilenetv3_large_150d",)
_TIMM_V3_NAME = re.compile(r"(tf_)?mobilenetv3_(large|small)(_minimal)?_\d{3}d?")


def conv_bn_key(prefix: str, rest: str) -> str:
    """torchvision's Conv2dNormActivation ("0." conv, "1." bn) -> our ConvBNAct names."""
    index, _, tail = rest.partition(".")
    return f"{prefix}{ {'0': 'conv', '1': 'bn'}.get(index, index) }.{tail}"


def _present(block: InvertedResidual) -> list[str]:
    names = ["expand", "dw", "se", "project"]
    return [n for n in names if not isinstance(getattr(block, n), nn.Identity)]


def torchvision_block_key(prefix: str, rest: str, block: InvertedResidual) -> str:
    """A key inside torchvision's InvertedResidual (``rest``) -> ours, under ``prefix``."""
    seq, _, rest = rest.partition(".")
    index, _, tail = rest.partition(".")
    if not index.isdigit():
        return prefix + ".".join([seq, index, tail])
    j = int(index)
    if seq == "block":  # V3: one entry per sub-module (expand?, dw, se?, project)
        present = _present(block)
        if j >= len(present):
            return f"{prefix}block.{rest}"
        name = present[j]
        return f"{prefix}{name}.{tail}" if name == "se" else conv_bn_key(f"{prefix}{name}.", tail)
    # V2: [expand?, dw] as Conv2dNormActivation, then the projection's conv and bn.
    convs = [n for n in _present(block) if n in ("expand", "dw")]
    if j < len(convs):
        return conv_bn_key(f"{prefix}{convs[j]}.", tail)
    plain = {len(convs): "project.conv", len(convs) + 1: "project.bn"}
    return f"{prefix}{plain.get(j, seq + '.' + index)}.{tail}"


def _from_torchvision(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, MobileNet)
    out: StateDict = {}
    is_v3 = any(".block." in k for k in state_dict)
    for key, tensor in state_dict.items():
        new = key
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m and int(m[1]) < len(model.features):
            prefix, rest = f"features.{m[1]}.", m[2]
            layer = model.features[int(m[1])]
            if isinstance(layer, ConvBNAct):
                new = conv_bn_key(prefix, rest)
            elif isinstance(layer, InvertedResidual):
                new = torchvision_block_key(prefix, rest, layer)
        elif key.startswith("classifier."):
            index, _, tail = key.removeprefix("classifier.").partition(".")
            # V2: [Dropout, Linear]; V3: [Linear, Hardswish, Dropout, Linear]
            names = {"0": "pre_logits.fc", "3": "classifier"} if is_v3 else {"1": "classifier"}
            new = f"{names.get(index, 'classifier.' + index)}.{tail}"
        out[new] = tensor
    return out


# timm block parameter names -> ours, by the kind of our layer.
_TIMM_CONV_BN = {"conv": "conv", "bn1": "bn"}
_TIMM_DS_V1 = {"conv_dw": "dw.conv", "bn1": "dw.bn", "conv_pw": "pw.conv", "bn2": "pw.bn"}
_TIMM_SE = {"se.conv_reduce": "se.fc1", "se.conv_expand": "se.fc2"}
_TIMM_IR = {
    "conv_pw": "expand.conv",
    "bn1": "expand.bn",
    "conv_dw": "dw.conv",
    "bn2": "dw.bn",
    **_TIMM_SE,
    "conv_pwl": "project.conv",
    "bn3": "project.bn",
}
_TIMM_DS_IR = {
    "conv_dw": "dw.conv",
    "bn1": "dw.bn",
    **_TIMM_SE,
    "conv_pw": "project.conv",
    "bn2": "project.bn",
}


def _from_timm(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, MobileNet)
    # timm nests blocks in stages (blocks.<stage>.<block>); ours are flat after the stem.
    blocks = sorted(
        {
            tuple(map(int, m.groups()))
            for k in state_dict
            if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))
        }
    )
    flat = {f"blocks.{s}.{b}.": i + 1 for i, (s, b) in enumerate(blocks)}
    has_pwl = {p for p in flat if any(k.startswith(p + "conv_pwl.") for k in state_dict)}
    last = len(model.features) - 1
    out: StateDict = {}
    for key, tensor in state_dict.items():
        new = key
        m = re.fullmatch(r"(blocks\.\d+\.\d+\.)((?:se\.)?\w+)\.(\w+)", key)
        if m and m[1] in flat and flat[m[1]] <= last:
            index = flat[m[1]]
            layer = model.features[index]
            if isinstance(layer, ConvBNAct):
                names = _TIMM_CONV_BN
            elif isinstance(layer, DepthwiseSeparable):
                names = _TIMM_DS_V1
            else:
                names = _TIMM_IR if m[1] in has_pwl else _TIMM_DS_IR
            new = f"features.{index}.{names.get(m[2], m[2])}.{m[3]}"
        elif key.startswith(("conv_stem.", "bn1.")):
            new = key.replace("conv_stem.", "features.0.conv.").replace("bn1.", "features.0.bn.")
        elif key.startswith("bn2."):  # V1/V2 head: conv_head + bn2 is our last ConvBNAct
            new = f"features.{last}.bn.{key.removeprefix('bn2.')}"
        elif key.startswith("conv_head."):
            if "conv_head.bias" in state_dict:  # V3: a biased 1x1 conv on pooled features
                new = f"pre_logits.fc.{key.removeprefix('conv_head.')}"
                tensor = tensor.flatten(1) if tensor.dim() == 4 else tensor
            else:
                new = f"features.{last}.conv.{key.removeprefix('conv_head.')}"
        out[new] = tensor
    return out


def _classes(*keys: str):
    def num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
        for key in keys:
            if key in state_dict:
                return int(state_dict[key].shape[0])
        return 0  # saved without a classifier

    return num_classes


def _own_settings(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str
) -> dict[str, object]:
    """Our files' padding and build, from their saved config (files from before these
    fields existed were padded symmetrically)."""
    saved = saved_config(metadata) or {}
    return {"padding": saved.get("padding", "symmetric"), "keras": saved.get("keras", False)}


def _timm_settings(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str
) -> dict[str, object]:
    """PyTorch padding and BatchNorm eps, or, for the tf_* models, TF's (and their [-1, 1]
    input scaling)."""
    if "conv_head.bias" in state_dict and timm_v3_model(state_dict, metadata, name).startswith(
        "tf_"
    ):
        return {"padding": "same", "bn_eps": TF_BN_EPS, "preprocess": TF_PREPROCESS}
    return {"padding": "symmetric"}


def timm_v3_model(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str], name: str
) -> str:
    """The timm model a MobileNetV3 state dict was saved from, or at least whether it is a
    ``tf_*`` one: from the caller's ``origin``, else a timm name in ``name`` (a path), else
    the tensors where only one kind exists at their size; refused otherwise."""
    origin = metadata.get("origin")
    if origin is not None:
        library, _, model = origin.partition(":")
        if library != "timm" or not model:
            raise CheckpointError(
                f"{name} is a timm checkpoint; its origin must be 'timm:MODEL', got {origin!r}"
            )
        return model
    if (found := _TIMM_V3_NAME.search(name)) is not None:
        return found[0]
    fits = _timm_v3_candidates(state_dict)
    if fits and len({model.startswith("tf_") for model in fits}) == 1:
        return fits[0]
    kinds = " or ".join(fits) if fits else "mobilenetv3_* (PyTorch padding) or tf_mobilenetv3_*"
    raise CheckpointError(
        f"{name}: a timm MobileNetV3 state dict could be {kinds}, which its tensors do not "
        "tell apart (PyTorch or TensorFlow padding); name it: origin='timm:MODEL' "
        "(mobilenet convert --from timm:MODEL)"
    )


def _timm_v3_candidates(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The timm MobileNetV3 models with this state dict's size, variant, width and depth."""
    blocks = {m[0] for k in state_dict if (m := re.match(r"blocks\.\d+\.\d+\.", k))}
    large = len(blocks) > 12  # 15 bnecks and the last conv; Small: 11 and 1
    deep = "d" if len(blocks) > (16 if large else 12) else ""  # depth-scaled (large_150d)
    minimal = "" if any(".se." in k for k in state_dict) else "_minimal"
    last = state_dict["conv_head.weight"].shape[1]  # 960 (Large) or 576 (Small) x width
    width = round(100 * last / (960 if large else 576))
    kind = f"mobilenetv3_{'large' if large else 'small'}{minimal}_{width:03d}{deep}"
    known = TIMM_V3_MODELS + TIMM_V3_DEEP_MODELS
    return [model for model in known if model.removeprefix("tf_") == kind]


def _torchvision_bn_eps(state_dict: Mapping[str, torch.Tensor]) -> float:
    is_v3 = any(".block." in k for k in state_dict)
    return TORCHVISION_V3_BN_EPS if is_v3 else PYTORCH_BN_EPS


register_layout(
    Layout(
        FORMAT,
        MobileNet,
        matches=lambda sd: "features.0.conv.weight" in sd,
        num_classes=_classes("classifier.weight"),
        settings=_own_settings,
    )
)
register_layout(
    Layout(
        "torchvision",
        MobileNet,
        matches=lambda sd: "features.0.0.weight" in sd,
        num_classes=_classes("classifier.3.weight", "classifier.1.weight"),
        translate=_from_torchvision,
        bn_eps=_torchvision_bn_eps,
    )
)
register_layout(
    Layout(
        "timm",
        MobileNet,
        matches=lambda sd: "conv_stem.weight" in sd,
        num_classes=_classes("classifier.weight"),
        translate=_from_timm,
        bn_eps=lambda sd: PYTORCH_BN_EPS,
        settings=_timm_settings,
    )
)
