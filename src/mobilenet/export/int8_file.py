"""PyTorch int8 models as safetensors: nothing pickled.

A quantized PyTorch model is usually saved by pickling the module or a TorchScript
trace. Here it is a safetensors file instead: every quantized tensor is stored as its
integer values plus its scale(s) and zero point(s), and loading rebuilds the same
quantized graph from the model's card (config, input size, method) and restores those
tensors exactly, so a reloaded model gives bit-identical outputs.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..card import ModelCard
from ..errors import CheckpointError, MobileNetError
from ..fileio import write_bytes
from ..models import create_model
from .int8 import BACKEND, METHODS, Int8Model, convert_fx_int8, prepare_fx_int8, x86_backend

__all__ = ["FORMAT", "int8_from_checkpoint", "is_int8_checkpoint", "save_int8"]

_QDTYPES = {str(d): d for d in (torch.qint8, torch.quint8, torch.qint32)}
FORMAT = "mobilenet-int8"


def save_int8(model: Int8Model, path: str | Path, card: ModelCard) -> Path:
    """Write an int8 model as sealed safetensors (integer values, scales, zero points)
    with ``card`` (the float model's classes, input size and preprocessing)."""
    from ..weights import sealed_safetensors

    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for key, value in model.net.state_dict().items():
        _flatten(key, value, tensors, kinds)
    scheme: dict[str, Any] = {"method": model.method, "scheme": f"fx-{BACKEND}"}
    if model.calibration_images is not None:  # provenance: what the ranges were measured on
        scheme["calibration_images"] = model.calibration_images
    card = card.replace(config=model.config.to_dict(), precision="int8", quantization=scheme)
    metadata = {**card.metadata(), "format": FORMAT, "kinds": json.dumps(kinds)}
    path = Path(path)
    # Serialised in memory first: safetensors' own writer reports no error on a full disk.
    write_bytes(path, sealed_safetensors(tensors, metadata))
    return path


def is_int8_checkpoint(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def int8_from_checkpoint(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> tuple[Int8Model, ModelCard]:
    """Rebuild the quantized graph from the stored card and restore its tensors."""
    from ..deployed import classifier_config

    card = ModelCard.read(metadata, source)
    config = classifier_config(card, Path(source))
    scheme = card.quantization or {}
    # before the card: "x86-ptq" as the scheme
    method = scheme.get("method") or str(scheme.get("scheme", "")).rsplit("-", 1)[-1]
    try:
        kinds = json.loads(metadata["kinds"])
        if card.resolution is None:
            raise ValueError("no square input size")
        if method not in METHODS:
            raise ValueError(f"quantization {metadata.get('quantization')!r}")
        if not isinstance(kinds, dict):
            raise TypeError("kinds is not a JSON object")
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: damaged int8 model metadata ({e})") from None
    model = create_model(
        config.name,
        width_mult=config.width_mult,
        num_classes=config.num_classes,
        dropout=config.dropout,
    )
    model.set_bn_eps(config.bn_eps)
    with x86_backend():
        net = convert_fx_int8(prepare_fx_int8(model, method, card.resolution))
        try:
            state = OrderedDict(
                (key, _unflatten(key, kinds, tensors)) for key in kinds if "#" not in key
            )
            # Quantized modules read their tensors by the state-dict version of each module
            # (kept in ``_metadata``); the rebuilt network has the same modules and versions.
            state._metadata = net.state_dict()._metadata  # type: ignore[attr-defined]
            net.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"{source}: the int8 tensors do not fit {config.name} ({first})"
            ) from None
    used = scheme.get("calibration_images", metadata.get("calibration_images"))
    used = int(used) if isinstance(used, int) or str(used).isdigit() else None
    return Int8Model(net, config, method, used), card


def _flatten(key: str, value: Any, out: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
    if value is None:
        kinds[key] = "none"
    elif isinstance(value, torch.dtype):
        kinds[key] = f"dtype:{value}"
    elif isinstance(value, tuple | list):
        kinds[key] = f"tuple:{len(value)}"
        for i, item in enumerate(value):
            _flatten(f"{key}#{i}", item, out, kinds)
    elif isinstance(value, torch.Tensor) and value.is_quantized:
        out[key] = value.int_repr().contiguous()
        if value.qscheme() == torch.per_tensor_affine:
            kinds[key] = f"qtensor:{value.dtype}"
            out[f"{key}#scale"] = torch.tensor([value.q_scale()], dtype=torch.float64)
            out[f"{key}#zero_point"] = torch.tensor([value.q_zero_point()])
        elif value.qscheme() == torch.per_channel_affine:
            kinds[key] = f"qchannel:{value.dtype}:{value.q_per_channel_axis()}"
            out[f"{key}#scale"] = value.q_per_channel_scales().contiguous()
            out[f"{key}#zero_point"] = value.q_per_channel_zero_points().contiguous()
        else:
            raise MobileNetError(f"{key}: quantization scheme {value.qscheme()} not supported")
    elif isinstance(value, torch.Tensor):
        kinds[key] = "tensor"
        out[key] = value.detach().contiguous().clone()
    else:
        raise MobileNetError(f"{key}: cannot store a {type(value).__name__}")


def _unflatten(key: str, kinds: dict[str, str], tensors: dict[str, torch.Tensor]) -> Any:
    kind = kinds[key]
    name, _, rest = kind.partition(":")
    if name == "none":
        return None
    if name == "dtype":
        return _QDTYPES[rest]
    if name == "tuple":
        return tuple(_unflatten(f"{key}#{i}", kinds, tensors) for i in range(int(rest)))
    if name == "tensor":
        return tensors[key]
    if name == "qtensor":
        scale, zero_point = tensors[f"{key}#scale"], tensors[f"{key}#zero_point"]
        return torch._make_per_tensor_quantized_tensor(
            tensors[key], float(scale[0]), int(zero_point[0])
        )
    if name == "qchannel":
        axis = int(rest.rsplit(":", 1)[1])
        return torch._make_per_channel_quantized_tensor(
            tensors[key], tensors[f"{key}#scale"], tensors[f"{key}#zero_point"], axis
        )
    raise CheckpointError(f"unknown stored kind {kind!r} for {key}: not an int8 file of ours")
