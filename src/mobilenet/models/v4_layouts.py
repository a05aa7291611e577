"""The checkpoint layout MobileNetV4 reads from timm: ``mobilenetv4_conv_small``
(``_035``, ``_050``), ``mobilenetv4_conv_medium``, ``mobilenetv4_conv_large``,
``mobilenetv4_hybrid_medium`` (``_075``) and ``mobilenetv4_hybrid_large`` (``_075``)
state dicts (``.pth``, ``.bin`` or the hub's ``model.safetensors``), and the anti-aliased
``mobilenetv4_conv_aa_medium``, ``mobilenetv4_conv_blur_medium`` and
``mobilenetv4_conv_aa_large``, whose downsamplers hold no tensors: their state dicts are
Conv-M's and Conv-L's, read into ``mobilenet_v4_conv_{aa,blur}_medium`` and
``mobilenet_v4_conv_aa_large``.

timm nests the blocks in stages (``blocks.<stage>.<block>``); ours are flat after the
stem, and timm's last stage (the 1x1 conv to 960) is our last feature layer. timm's
V4 trained with PyTorch's BatchNorm epsilon (1e-5), which the layout carries so outputs
match exactly. Our own files need no layout of their own: the classifiers' (keys as in
our modules) reads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..blocks import FusedInvertedBottleneck, MobileMQA, UniversalInvertedBottleneck
from ..layers import ConvBNAct
from ..weights import Layout, register_layout
from .mobilenet_v4 import MobileNetV4

__all__ = ["TIMM_V4_BN_EPS", "timm_v4_key"]

StateDict = dict[str, torch.Tensor]
TIMM_V4_BN_EPS = 1e-5  # nn.BatchNorm2d's default: timm builds V4 with no BN arguments

# timm module paths inside one block -> ours, by the kind of our block.
_CONV = {"conv": "conv", "bn1": "bn"}
_FUSED = {
    "conv_exp": "expand.conv",
    "bn1": "expand.bn",
    "conv_pwl": "project.conv",
    "bn2": "project.bn",
}
_UIB = {
    "dw_start.conv": "dw_start.conv",
    "dw_start.bn": "dw_start.bn",
    "pw_exp.conv": "expand.conv",
    "pw_exp.bn": "expand.bn",
    "dw_mid.conv": "dw_mid.conv",
    "dw_mid.bn": "dw_mid.bn",
    "pw_proj.conv": "project.conv",
    "pw_proj.bn": "project.bn",
    "layer_scale": "layer_scale",
}
_MQA = {
    "norm": "norm",
    "attn.query.norm": "attn.query_down.1",
    "attn.query.proj": "attn.query",
    "attn.key.down_conv": "attn.key_down.conv",
    "attn.key.norm": "attn.key_down.bn",
    "attn.key.proj": "attn.key",
    "attn.value.down_conv": "attn.value_down.conv",
    "attn.value.norm": "attn.value_down.bn",
    "attn.value.proj": "attn.value",
    "attn.output.proj": "attn.output",
    "layer_scale": "layer_scale",
}
_NAMES: list[tuple[type[nn.Module], dict[str, str]]] = [
    (ConvBNAct, _CONV),
    (FusedInvertedBottleneck, _FUSED),
    (UniversalInvertedBottleneck, _UIB),
    (MobileMQA, _MQA),
]


def timm_v4_key(rest: str, layer: nn.Module) -> str | None:
    """A parameter path inside one of timm's V4 blocks (``pw_exp.conv.weight``) -> ours
    inside ``layer`` (``expand.conv.weight``); None when ``layer`` has no such part."""
    module, _, param = rest.rpartition(".")
    for kind, names in _NAMES:
        if isinstance(layer, kind) and module in names:
            return f"{names[module]}.{param}"
    return None


def _from_timm(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, MobileNetV4)
    blocks = sorted(
        {
            tuple(map(int, m.groups()))
            for k in state_dict
            if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))
        }
    )
    flat = {f"blocks.{s}.{b}.": i + 1 for i, (s, b) in enumerate(blocks)}
    out: StateDict = {}
    for key, tensor in state_dict.items():
        new: str | None = None
        m = re.fullmatch(r"(blocks\.\d+\.\d+\.)(.+)", key)
        if m and flat[m[1]] < len(model.features):
            index = flat[m[1]]
            rest = timm_v4_key(m[2], model.features[index])
            new = f"features.{index}.{rest}" if rest is not None else None
        elif key.startswith(("conv_stem.", "bn1.")):
            new = key.replace("conv_stem.", "features.0.conv.").replace("bn1.", "features.0.bn.")
        elif key == "conv_head.weight":  # the 1x1 conv on the pooled features
            new = "pre_logits.layer.conv.weight"
        elif key.startswith("norm_head."):
            new = f"pre_logits.layer.bn.{key.removeprefix('norm_head.')}"
        out[new if new is not None else key] = tensor  # unknown keys are reported by the fit
    return out


def _num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    weight = state_dict.get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else 0  # saved without a classifier


register_layout(
    Layout(
        "timm",
        MobileNetV4,
        # the BatchNorm after the head conv is V4's alone among timm's MobileNets
        matches=lambda sd: "conv_stem.weight" in sd and "norm_head.weight" in sd,
        num_classes=_num_classes,
        translate=_from_timm,
        bn_eps=lambda sd: TIMM_V4_BN_EPS,
    )
)
