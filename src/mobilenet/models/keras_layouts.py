"""Keras' ``keras.applications`` MobileNet weights (V1, V2, V3) in our classifiers.

:mod:`mobilenet.weights.keras` reads a Keras file (legacy ``.h5``, ``.weights.h5``,
``.keras``) into ``{"<layer>/<i>": array}``; this layout renames the layers into ours,
by the Keras names of each application:

* ``MobileNet`` (V1): ``conv1``, ``conv1_bn``; ``conv_dw_<i>``, ``conv_pw_<i>`` and their
  ``_bn`` (i = 1..13); ``conv_preds`` (the classifier, a biased 1x1 conv);
* ``MobileNetV2``: ``Conv1``, ``bn_Conv1``; ``expanded_conv_`` (block 0) and ``block_<i>_``
  with ``expand``, ``depthwise``, ``project`` and their ``_BN``; ``Conv_1``, ``Conv_1_bn``;
  ``predictions`` (Dense);
* ``MobileNetV3Large`` / ``Small`` (``minimalistic`` too): ``conv``, ``conv_bn``;
  ``expanded_conv_`` / ``expanded_conv_<i>_`` with ``expand``, ``depthwise``,
  ``squeeze_excite_conv``, ``squeeze_excite_conv_1``, ``project`` and their ``_bn``;
  ``conv_1``, ``conv_1_bn``; ``conv_2`` (the hidden head layer) and ``logits`` (biased
  1x1 convs). The files TF-Keras 2 wrote (the downloaded ``weights_mobilenet_v3_*.h5``)
  spell these ``Conv/BatchNorm``, ``expanded_conv/depthwise``: names are compared
  lower-cased, with "/" as "_" and "BatchNorm" as "bn".

Kernels are NHWC/HWIO (``[kh, kw, in, out]``; depthwise ``[kh, kw, in, 1]``): they are
permuted into PyTorch's ``[out, in, kh, kw]``. Every Keras MobileNet uses BatchNorm
epsilon 1e-3 and TensorFlow's SAME padding, so the checkpoint needs Keras' build of our
model (``keras=True``, see the family modules), and sets nothing it cannot check. A file
saved with ``include_top=False`` holds no head: the model's own head (V3's hidden layer
and the classifier, any number of classes) is kept as initialised.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..blocks import DepthwiseSeparable, InvertedResidual
from ..errors import CheckpointError
from ..layers import ConvBNAct, SqueezeExcite
from ..weights import Layout, register_layout
from .base import MobileNet
from .padding import TF_PREPROCESS

__all__ = ["KERAS_BN_EPS", "keras_family", "keras_layer_name"]

KERAS_BN_EPS = 1e-3
StateDict = dict[str, torch.Tensor]
Tensors = Mapping[str, torch.Tensor]
# The layer that identifies each application, and its classifier.
_STEM_BN = {"v1": "conv1_bn", "v2": "bn_conv1", "v3": "conv_bn"}
_CLASSIFIER = {"v1": "conv_preds", "v2": "predictions", "v3": "logits"}
_KERAS_NAMES = {"v1": "MobileNet", "v2": "MobileNetV2", "v3": "MobileNetV3"}


def keras_layer_name(name: str) -> str:
    """A Keras layer name as compared: ``Conv/BatchNorm`` -> ``conv_bn``."""
    return name.lower().replace("/", "_").replace("batchnorm", "bn")


def _layers(state_dict: Tensors) -> dict[str, list[torch.Tensor]]:
    """``{"<layer>/<i>": tensor}`` -> ``{layer: [weight 0, weight 1, ...]}``."""
    layers: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        layer, _, index = key.rpartition("/")
        layers.setdefault(keras_layer_name(layer), {})[int(index)] = tensor
    return {name: [w[i] for i in sorted(w)] for name, w in layers.items()}


def _is_keras(state_dict: Tensors) -> bool:
    if not state_dict or not all(re.fullmatch(r".+/\d+", k) for k in state_dict):
        return False
    return keras_family(state_dict) is not None


def keras_family(state_dict: Tensors) -> str | None:
    """``"v1"``, ``"v2"`` or ``"v3"``: the Keras application a state dict holds."""
    names = {keras_layer_name(k.rpartition("/")[0]) for k in state_dict}
    found = [family for family, stem in _STEM_BN.items() if stem in names]
    return found[0] if len(found) == 1 else None


def _num_classes(state_dict: Tensors) -> int:
    family = keras_family(state_dict)
    bias = _layers(state_dict).get(_CLASSIFIER.get(family or "", ""), [])
    return int(bias[-1].shape[0]) if len(bias) == 2 else 0


def _family_of(model: MobileNet) -> str:
    name = model.config.name
    if name == "mobilenet_v1":
        return "v1"
    if name == "mobilenet_v2":
        return "v2"
    if name.startswith("mobilenet_v3"):
        return "v3"
    raise CheckpointError(f"Keras has no {name}: its MobileNets load into V1, V2 and V3")


def _conv_bn(prefix: str, conv: str, kind: str = "conv") -> list[tuple[str, str, str]]:
    return [(f"{prefix}.conv", conv, kind), (f"{prefix}.bn", f"{conv}_bn", "bn")]


def _names(model: MobileNet, family: str) -> Iterator[tuple[str, str, str]]:
    """(our module, Keras layer, kind) for every layer of ``model``."""
    last = len(model.features) - 1
    stem = {"v1": ("conv1", "conv1_bn"), "v2": ("conv1", "bn_conv1"), "v3": ("conv", "conv_bn")}
    yield ("features.0.conv", stem[family][0], "conv")
    yield ("features.0.bn", stem[family][1], "bn")
    for i, layer in enumerate(model.features):
        if i == 0:
            continue
        if isinstance(layer, DepthwiseSeparable):  # V1
            yield from _conv_bn(f"features.{i}.dw", f"conv_dw_{i}", "dw")
            yield from _conv_bn(f"features.{i}.pw", f"conv_pw_{i}")
        elif isinstance(layer, InvertedResidual):
            yield from _block(f"features.{i}", layer, family, i - 1)
        elif isinstance(layer, ConvBNAct) and i == last:
            yield from _conv_bn(f"features.{i}", "conv_1")
    if family == "v3":
        yield ("pre_logits.fc", "conv_2", "fc")
    yield ("classifier", _CLASSIFIER[family], "fc")


def _block(
    prefix: str, block: InvertedResidual, family: str, j: int
) -> Iterator[tuple[str, str, str]]:
    if family == "v2":
        keras = "expanded_conv_" if j == 0 else f"block_{j}_"
    else:
        keras = "expanded_conv_" if j == 0 else f"expanded_conv_{j}_"
    if isinstance(block.expand, ConvBNAct):
        yield from _conv_bn(f"{prefix}.expand", f"{keras}expand")
    yield from _conv_bn(f"{prefix}.dw", f"{keras}depthwise", "dw")
    if isinstance(block.se, SqueezeExcite):
        yield (f"{prefix}.se.fc1", f"{keras}squeeze_excite_conv", "fc_conv")
        yield (f"{prefix}.se.fc2", f"{keras}squeeze_excite_conv_1", "fc_conv")
    yield from _conv_bn(f"{prefix}.project", f"{keras}project")


def _convert(ours: str, weights: list[torch.Tensor], kind: str, layer: str) -> StateDict:
    """One Keras layer's weights under our module ``ours``, in PyTorch's layouts."""
    if kind == "bn":
        if len(weights) != 4:
            raise CheckpointError(f"Keras layer {layer} has {len(weights)} weights, not 4 (BN)")
        names = ("weight", "bias", "running_mean", "running_var")
        return {f"{ours}.{n}": w for n, w in zip(names, weights, strict=True)}
    kernel, rest = weights[0], weights[1:]
    if kernel.dim() == 4 and kind == "dw":  # [kh, kw, in, mult] -> [in * mult, 1, kh, kw]
        kh, kw = kernel.shape[:2]
        weight = kernel.reshape(kh, kw, -1, 1).permute(2, 3, 0, 1)
    elif kernel.dim() == 4 and kind in ("conv", "fc_conv"):  # HWIO -> OIHW
        weight = kernel.permute(3, 2, 0, 1)
    elif kind == "fc":  # a Dense [in, out] or a 1x1 conv [1, 1, in, out] -> [out, in]
        weight = kernel.reshape(-1, kernel.shape[-1]).t()
    else:
        raise CheckpointError(f"Keras layer {layer}: a kernel of shape {list(kernel.shape)}")
    out = {f"{ours}.weight": weight.contiguous()}
    if rest:
        out[f"{ours}.bias"] = rest[0]
    if len(rest) > 1:
        raise CheckpointError(f"Keras layer {layer} has {len(weights)} weights, not 1 or 2")
    return out


def _from_keras(state_dict: StateDict, model: nn.Module) -> StateDict:
    assert isinstance(model, MobileNet)
    family, held = _family_of(model), keras_family(state_dict)
    if held != family:
        raise CheckpointError(
            f"a Keras {_KERAS_NAMES.get(held or '', 'model')}, not a {model.config.name}"
        )
    layers = _layers(state_dict)
    names = list(_names(model, family))
    head = {"conv_2", _CLASSIFIER[family]}
    headless = not (head & set(layers))  # saved with include_top=False
    missing = [k for _, k, _ in names if k not in layers and not (headless and k in head)]
    extra = sorted(set(layers) - {k for _, k, _ in names})
    if missing or extra:
        parts = [f"{len(missing)} missing: {', '.join(missing[:4])}"] if missing else []
        parts += [f"{len(extra)} unexpected: {', '.join(extra[:4])}"] if extra else []
        raise CheckpointError(
            f"the Keras {_KERAS_NAMES[family]}'s layers do not fit {model.config.name} "
            f"(minimalistic or not, Large or Small?): {'; '.join(parts)}"
        )
    out: StateDict = {}
    for ours, keras, kind in names:
        if keras in layers:
            out.update(_convert(ours, layers[keras], kind, keras))
    if headless:  # the model's own head, as initialised
        own = model.state_dict()
        out.update({k: v for k, v in own.items() if k.startswith(("classifier.", "pre_logits."))})
    return out


def _settings(state_dict: Tensors, metadata: Mapping[str, str], name: str) -> dict[str, object]:
    return {"keras": True, "padding": "same", "bn_eps": KERAS_BN_EPS, "preprocess": TF_PREPROCESS}


register_layout(
    Layout(
        "keras",
        MobileNet,
        matches=_is_keras,
        num_classes=_num_classes,
        translate=_from_keras,
        settings=_settings,
    )
)
