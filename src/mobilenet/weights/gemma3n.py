"""Gemma 3n's vision tower, read out of the sharded checkpoint Hugging Face Transformers
stores Gemma 3n in, without reading the language model.

Transformers saves ``Gemma3nForConditionalGeneration`` as a folder of shards,
``model-0000N-of-0000M.safetensors``, and an index, ``model.safetensors.index.json``,
whose ``weight_map`` names the shard of every tensor. The vision tower, timm's
``mobilenetv5_300m_enc`` (MobileNetV5-300M, 294M parameters) wrapped by Transformers'
``TimmWrapperModel``, keeps timm's names under ``model.vision_tower.timm_model.``, spread
over the shards beside billions of the language model's and the audio tower's parameters.

:func:`read_vision_tower` takes the folder or its index file. It reads the index (at most
:data:`MAX_INDEX_BYTES`; every shard name a plain file name in the index's folder, never a
path that leaves it), opens only the shards that hold the tower's tensors with
``safetensors.safe_open`` (memory-mapped: a shard is read where its tower's tensors lie,
nowhere else) and reads only those tensors, with the prefix stripped: timm's state dict,
which MobileNetV5's timm layout loads (``mobilenet.models.v5_layouts``). A shard the
tower does not use is never opened, so a folder holding only the tower's shards reads
too. ``safe_open`` checks a shard's header against its size before anything is read,
as ``read_checkpoint`` checks a single file: a truncated shard is refused in one line.

The preprocessing travels with the tensors as the card's (:data:`PREPROCESS`). Transformers'
image processor for Gemma 3n (``convert_gemma3n_weights.py`` in huggingface/transformers:
``SiglipImageProcessorFast(size={"height": 768, "width": 768},
resample=PILImageResampling.BILINEAR, do_normalize=False)``, rescaling by 1/255) feeds
the tower pixels in [0, 1] (mean 0, std 1) at 768x768, resized bilinearly; timm's
``pretrained_cfg`` of ``mobilenetv5_300m_enc`` agrees but for the interpolation
(bicubic). The card keeps Transformers', whose files these are. Transformers resizes both
sides to 768 (the aspect ratio is not kept); the card's preprocessing resizes the shorter
side to 768 and crops the centre (``crop_pct`` 1.0): the same image for square inputs.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

__all__ = [
    "INDEX_FILE",
    "INDEX_SUFFIX",
    "MAX_INDEX_BYTES",
    "MAX_TOWER_BYTES",
    "PREPROCESS",
    "VISION_PREFIX",
    "is_sharded_checkpoint",
    "read_index",
    "read_vision_tower",
    "vision_tower_card",
    "vision_tower_metadata",
]

StateDict = dict[str, torch.Tensor]

INDEX_SUFFIX = ".safetensors.index.json"
INDEX_FILE = "model" + INDEX_SUFFIX  # Transformers' name for it
VISION_PREFIX = "model.vision_tower.timm_model."  # Gemma3nModel.vision_tower.timm_model
# An index lists each tensor's name and shard once: 32 MiB of it is damage, not an index.
MAX_INDEX_BYTES = 32 << 20
# The float32 MobileNetV5-300M is 1.18 GB: a tower declaring more is damaged or hostile,
# and is refused before its tensors are read.
MAX_TOWER_BYTES = 4 << 30
# A shard is named by a plain file name: no folder, no "..", no drive, no control character.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}\.safetensors", re.ASCII)
# Bytes per element of safetensors' dtypes (an unknown one counts as 8: the widest).
_DTYPE_BYTES = {
    **dict.fromkeys(("BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2"), 1),
    **dict.fromkeys(("I16", "U16", "F16", "BF16"), 2),
    **dict.fromkeys(("I32", "U32", "F32"), 4),
    **dict.fromkeys(("I64", "U64", "F64"), 8),
}

# Transformers' Gemma 3n image processor (see the module docstring), in the JSON form of
# mobilenet.data.preprocess.Preprocess: pixels in [0, 1] at 768x768, bilinear.
PREPROCESS = {
    "name": "gemma3n (transformers)",
    "resolution": 768,
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
}


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is read as a sharded Transformers checkpoint: a folder, or a file
    named ``*.safetensors.index.json``."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(INDEX_SUFFIX)


def read_vision_tower(path: str | os.PathLike[str]) -> tuple[StateDict, dict[str, str]]:
    """Gemma 3n's vision tower in timm's names, and its card, from a sharded Transformers
    checkpoint (the folder or its index file); only the tower's shards are opened and
    only its tensors read. Anything amiss is one :class:`CheckpointError` line."""
    index, weight_map, keys = _vision_index(Path(path))
    by_shard: dict[str, list[str]] = {}
    for key in keys:
        by_shard.setdefault(weight_map[key], []).append(key)
    shards = {_shard_file(index, name): names for name, names in by_shard.items()}
    declared = sum(_declared_bytes(shard, names) for shard, names in shards.items())
    if declared > MAX_TOWER_BYTES:
        raise CheckpointError(
            f"{index}: its vision tower declares {declared / 2**30:.1f} GiB of tensors, more "
            f"than the {MAX_TOWER_BYTES >> 30} GiB a MobileNetV5 could need (the 300M's "
            "1.2 GB in float32): not read"
        )
    tensors: StateDict = {}
    for shard, names in shards.items():
        tensors.update(_read_tensors(shard, names))
    return tensors, vision_tower_card(str(index))


def vision_tower_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The card of the vision tower of a sharded checkpoint (the folder or its index
    file), from its index alone: no shard is opened."""
    index, _, _ = _vision_index(Path(path))
    return vision_tower_card(str(index))


def _vision_index(path: Path) -> tuple[Path, dict[str, str], list[str]]:
    """The index file, its weight map and the vision tower's names in it (refused in one
    line when there are none)."""
    index = _index_file(path)
    weight_map = read_index(index)
    keys = [k for k in weight_map if k.startswith(VISION_PREFIX)]
    if not keys:
        raise CheckpointError(
            f"{index}: no vision tower: none of its {len(weight_map)} tensors is under "
            f"{VISION_PREFIX!r} (a Gemma 3n checkpoint's vision encoder)"
        )
    return index, weight_map, keys


def vision_tower_card(source: str) -> dict[str, str]:
    """The card (``mobilenet.card`` keys, as strings) of a vision tower read from
    ``source``: Gemma 3n's input size and preprocessing."""
    return {
        "card": "1",
        "task": "classification",
        "resolution": str(PREPROCESS["resolution"]),
        "preprocess": json.dumps(PREPROCESS),
        "source": source,
    }


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a Transformers index (tensor name -> shard file name),
    checked: bounded in size, JSON, names that are strings, shard names that are plain
    file names in the index's folder."""
    try:
        with index.open("rb") as f:
            data = f.read(MAX_INDEX_BYTES + 1)
    except OSError as e:
        raise CheckpointError(f"{index}: cannot be read ({e.strerror or e})") from None
    if len(data) > MAX_INDEX_BYTES:
        raise CheckpointError(
            f"{index}: larger than {MAX_INDEX_BYTES >> 20} MiB, not a sharded checkpoint's index"
        )
    try:
        weight_map = json.loads(data).get("weight_map")
    except (ValueError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{index}: not a JSON index ({e})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: holds no 'weight_map' of tensor names to shards")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: its 'weight_map' maps names to something else")
    for name in sorted(set(weight_map.values())):
        if not _SHARD_NAME.fullmatch(name):
            raise CheckpointError(
                f"{index}: shard {name[:100]!r} is not a plain .safetensors file name in "
                "the index's folder, and nothing outside it is read"
            )
    return weight_map


def _index_file(path: Path) -> Path:
    if path.is_dir():
        index = path / INDEX_FILE
        if not index.is_file():
            raise CheckpointError(
                f"{path}: a folder is read as a sharded Transformers checkpoint, and holds "
                f"no {INDEX_FILE}"
            )
        return index
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _shard_file(index: Path, name: str) -> Path:
    """The shard ``name`` (already checked by :func:`read_index`) beside ``index``; a link
    is followed, as in the Hugging Face cache, whose snapshots link to its blobs."""
    shard = index.parent / name
    if not shard.is_file():  # missing, or a folder, a pipe ...: never opened
        raise CheckpointError(f"{index}: names shard {name}, which is not a file in {index.parent}")
    return shard


def _declared_bytes(shard: Path, names: list[str]) -> int:
    """What the tensors ``names`` of ``shard`` declare, from its header alone; a name the
    index places in the shard must be there."""
    with _opened(shard) as f:
        held = set(f.keys())
        absent = [k for k in names if k not in held]
        if absent:
            raise CheckpointError(
                f"{shard}: holds no {absent[0][:200]!r} ({len(absent)} of the tower's tensors), "
                "though the index places it there"
            )
        total = 0
        for key in names:
            view = f.get_slice(key)
            count = 1
            for side in view.get_shape():
                count *= side
            total += count * _DTYPE_BYTES.get(view.get_dtype(), 8)
        return total


def _read_tensors(shard: Path, names: list[str]) -> StateDict:
    """The tensors ``names`` of ``shard`` (and no other), the prefix stripped."""
    with _opened(shard) as f:
        try:
            return {k.removeprefix(VISION_PREFIX): f.get_tensor(k) for k in names}
        except (SafetensorError, OSError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from None


@contextmanager
def _opened(shard: Path) -> Iterator[Any]:
    """``safe_open`` of a shard, whose failures (a truncated header or data, not
    safetensors at all) are one :class:`CheckpointError` line naming it."""
    try:
        handle = safe_open(str(shard), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{shard}: not a readable safetensors file ({e})") from None
    with handle as f:
        yield f
