"""The checkpoint layout MobileNetV5 reads from timm: ``mobilenetv5_300m`` and
``mobilenetv5_300m_enc`` (Gemma 3n's encoder: the same tensors, padded differently) and
``mobilenetv5_base`` state dicts (``.pth``, ``.bin`` or the hub's ``model.safetensors``),
and Gemma 3n's own files, whose encoder tensors sit under
``model.vision_tower.timm_model.`` (as timm's ``checkpoint_filter_fn`` reads them).

timm nests the blocks in stages (``blocks.<stage>.<block>``); ours are flat after the
stem. Inside a block timm names the parts as in its MobileNetV4 (fused IB, UIB, Mobile
MQA: :func:`~mobilenet.models.v4_layouts.timm_v4_key`), its stem is a conv-norm-act
(``conv_stem.conv``, ``conv_stem.bn``: our ``features.0.conv`` and ``features.0.bn``) and
the MSFA's FFN a UIB. RMS norms have no statistics and no epsilon to carry; the padding is
the model's own (the state dicts of ``mobilenetv5_300m`` and ``_enc`` are alike). A
state dict of the other size is refused in one line, naming the model it fits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..weights import Layout, register_layout
from .mobilenet_v5 import MobileNetV5
from .v4_layouts import timm_v4_key

__all__ = ["GEMMA_PREFIX", "TIMM_V5_MODELS"]

StateDict = dict[str, torch.Tensor]
GEMMA_PREFIX = "model.vision_tower.timm_model."
# Blocks per stage (timm's arch_def) -> the timm model and ours.
TIMM_V5_MODELS = {
    (3, 5, 37, 39): ("mobilenetv5_300m", "mobilenet_v5_300m or mobilenet_v5_300m_enc"),
    (3, 5, 16, 15): ("mobilenetv5_base", "mobilenet_v5_base"),
}


def _encoder_tensors(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A Gemma 3n checkpoint's encoder tensors under timm's names; others' as they are."""
    if GEMMA_PREFIX + "conv_stem.conv.weight" not in state_dict:
        return dict(state_dict)
    return {
        k.removeprefix(GEMMA_PREFIX): v for k, v in state_dict.items() if k.startswith(GEMMA_PREFIX)
    }


def _blocks(state_dict: Mapping[str, torch.Tensor]) -> set[tuple[int, int]]:
    """timm's (stage, block) pairs."""
    found = (re.match(r"blocks\.(\d+)\.(\d+)\.", k) for k in state_dict)
    return {(int(m[1]), int(m[2])) for m in found if m}


def _stage_blocks(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    blocks = _blocks(state_dict)
    stages = sorted({s for s, _ in blocks})
    return tuple(sum(1 for s, _ in blocks if s == stage) for stage in stages)


def _check_size(state_dict: StateDict, model: MobileNetV5) -> None:
    """Refuse, in one line, a state dict of another MobileNetV5 size than ``model``'s."""
    stages = _stage_blocks(state_dict)
    ours = tuple(info.index - info.first + 1 for info in model.feature_info[1:])
    if stages != ours:
        timm_name, fits = TIMM_V5_MODELS.get(
            stages, (f"MobileNetV5 with {stages} blocks per stage", "none of ours")
        )
        raise CheckpointError(
            f"a timm {timm_name} state dict does not fit {model.config.name} "
            f"({ours} blocks per stage): it fits {fits}"
        )


def _from_timm(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, MobileNetV5)
    state_dict = _encoder_tensors(state_dict)
    _check_size(state_dict, model)
    blocks = sorted(_blocks(state_dict))
    flat = {f"blocks.{s}.{b}.": i + 1 for i, (s, b) in enumerate(blocks)}
    out: StateDict = {}
    for key, tensor in state_dict.items():
        new: str | None = key  # msfa.norm.*, classifier.*: our names too
        m = re.fullmatch(r"(blocks\.\d+\.\d+\.)(.+)", key)
        if m:
            index = flat[m[1]]
            rest = timm_v4_key(m[2], model.features[index])
            new = f"features.{index}.{rest}" if rest is not None else None
        elif key.startswith("conv_stem."):  # conv (with bias) and bn, as our ConvBNAct's
            new = f"features.0.{key.removeprefix('conv_stem.')}"
        elif key.startswith("msfa.ffn."):
            rest = timm_v4_key(key.removeprefix("msfa.ffn."), model.msfa.ffn)
            new = f"msfa.ffn.{rest}" if rest is not None else None
        out[new if new is not None else key] = tensor  # unknown keys are reported by the fit
    return out


def _matches(state_dict: Mapping[str, torch.Tensor]) -> bool:
    # timm's stem and the MSFA, which is V5's alone among timm's MobileNets
    keys = ("conv_stem.conv.weight", "msfa.norm.weight")
    return any(all(p + k in state_dict for k in keys) for p in ("", GEMMA_PREFIX))


def _num_classes(state_dict: Mapping[str, torch.Tensor]) -> int:
    weight = state_dict.get("classifier.weight")
    return int(weight.shape[0]) if weight is not None else 0  # the encoder, Gemma 3n's files


register_layout(
    Layout(
        "timm",
        MobileNetV5,
        matches=_matches,
        num_classes=_num_classes,
        translate=_from_timm,
    )
)
