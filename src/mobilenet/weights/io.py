"""Reading checkpoints people already have, and writing our own safetensors.

Pickled files are opened with ``torch.load(weights_only=True)`` only: tensors and plain
containers, never arbitrary objects. Our own files are safetensors whose metadata holds
``format = "mobilenet"`` and the model's config as JSON, so a file alone says which
network it holds. A folder, or a ``*.safetensors.index.json`` file, is a sharded Hugging
Face Transformers checkpoint: Gemma 3n's, whose vision tower alone is read
(:mod:`.gemma3n`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, safe_open, save
from torch import nn

from ..errors import CheckpointError
from ..fileio import read_bytes, write_bytes
from ..integrity import check_seal, seal, sealed_metadata
from .gemma3n import is_sharded_checkpoint, read_vision_tower, vision_tower_metadata
from .keras import ZIP_SIGNATURE, keras_kind, read_keras

__all__ = [
    "FORMAT",
    "PathLike",
    "StateDict",
    "read_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_weights",
    "saved_config",
    "sealed_safetensors",
]

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike[str]

FORMAT = "mobilenet"  # metadata["format"] of our safetensors files


def read_checkpoint(path: PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read a state dict and its metadata from safetensors, a (weights-only) pickle, a
    Keras file (:mod:`.keras`: legacy ``.h5``, ``.weights.h5``, ``.keras``) or a sharded
    Transformers checkpoint (a folder or its index: Gemma 3n's vision tower, with its
    card; :mod:`.gemma3n`)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return read_vision_tower(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if keras_kind(path) is not None:  # Keras .h5, .weights.h5 or .keras
        return read_keras(path)
    if not _is_safetensors(path):
        return _read_pickle(path), {}
    return _read_safetensors(path)


def _read_pickle(path: Path) -> StateDict:
    """The state dict of a PyTorch checkpoint, read by ``torch.load(weights_only=True)``:
    tensors and plain containers only, nothing else is unpickled."""
    try:
        with warnings.catch_warnings():  # its pickle-protocol notes are not the user's to act on
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if reason.startswith("Weights only load failed"):  # and torch's advice to unpickle
            reason = "it is not a weights-only pickle, and nothing else is unpickled"
        raise CheckpointError(
            f"{path}: not a readable checkpoint (safetensors, a Keras .h5/.keras file, or a "
            f"PyTorch state dict loadable with weights_only=True): {reason}"
        ) from None
    return _unwrap(obj, path)


def read_metadata(path: PathLike) -> dict[str, str]:
    """The metadata of a safetensors file, without reading its tensors ({} for pickles;
    the card of Gemma 3n's vision tower for a sharded checkpoint, whose index alone is
    read)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return vision_tower_metadata(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not _is_safetensors(path):
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_state_dict(
    checkpoint: PathLike | Mapping[str, torch.Tensor],
    source_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> tuple[StateDict, Mapping[str, str], str]:
    """(state dict, metadata, a name for messages) of a path or an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint), metadata or {}, source_name or "state dict"
    state_dict, metadata = read_checkpoint(checkpoint)
    return state_dict, metadata, source_name or str(checkpoint)


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    """Tensors and metadata of a safetensors file, read once; a file of ours is checked
    against the digest it was written with (:mod:`mobilenet.integrity`)."""
    data = read_bytes(path, str(path))
    try:
        tensors = load(data)  # checks the header against the file before using it
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: not a readable safetensors file (damaged metadata)")
    if metadata.get("format", "").startswith(FORMAT):  # ours (and int8's "mobilenet-int8");
        # others' files have their own checks (a hub's SHA-256)
        check_seal(data, str(path))
    return tensors, metadata


def _is_safetensors(path: Path) -> bool:
    # An 8-byte little-endian header length, then a JSON header starting with "{"; a zip
    # (a PyTorch checkpoint, a .keras file) is not one whatever its ninth byte.
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9 or head.startswith(ZIP_SIGNATURE):
        return False
    return head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def _unwrap(obj: object, path: Path) -> StateDict:
    """The state dict inside a training checkpoint ({"state_dict": ...}, {"model": ...})."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    if all(k.startswith("module.") for k in tensors):  # saved from DistributedDataParallel
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def saved_config(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The model config stored in our safetensors metadata, as a dict (None for files
    written by other libraries)."""
    if metadata.get("format") != FORMAT or "config" not in metadata:
        return None
    try:
        config = json.loads(metadata["config"])
    except ValueError as e:
        raise CheckpointError(f"corrupt model config in checkpoint metadata: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise CheckpointError("corrupt model config in checkpoint metadata: no model name")
    return config


def save_weights(
    model: nn.Module, path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the model's weights as safetensors, its config (``model.config.to_dict()``)
    and its evaluation preprocessing (``model.preprocess``, when it has one) as metadata,
    sealed with the SHA-256 of the file (:mod:`mobilenet.integrity`); atomically.

    The file is serialised in memory and written by Python, so a full disk or a read-only
    folder is one :class:`~mobilenet.MobileNetError` line, not an error of the library's
    own writer.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config = model.config.to_dict()  # type: ignore[operator]
    meta = {"format": FORMAT, "config": json.dumps(config), **(metadata or {})}
    # A classifier's mobilenet.data.preprocess.Preprocess (a detector's is a method).
    to_json = getattr(getattr(model, "preprocess", None), "to_json", None)
    if callable(to_json) and "preprocess" not in meta:
        meta["preprocess"] = to_json()  # how the weights were evaluated
    write_bytes(path, sealed_safetensors(tensors, meta))
    return path


def sealed_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """``tensors`` serialised as safetensors with ``metadata`` and the file's digest."""
    return seal(save(dict(tensors), metadata=sealed_metadata(dict(metadata))))
