"""Reading Keras weight files: legacy ``.h5``, Keras 3 ``.weights.h5`` and ``.keras``.

Three layouts hold a Keras model's weights, all HDF5 (read with h5py: plain arrays, never a
pickle):

* legacy ``.h5`` (Keras 2 ``save_weights``, the files ``keras.applications`` downloads, or
  ``model.save("x.h5")`` with the weights under ``model_weights``): one group per layer,
  listed in the ``layer_names`` attribute, each naming its arrays in ``weight_names``
  (``Conv1/kernel:0``);
* Keras 3 ``.weights.h5``: ``layers/<key>/vars/0, 1, ...``, the layer's name in the
  ``name`` attribute of ``vars`` (the keys are the layers' class names, numbered);
* ``.keras``: a zip holding ``config.json``, ``metadata.json`` and ``model.weights.h5``.

Each becomes a flat state dict ``{"<layer name>/<i>": tensor}``, the i-th weight of the
layer in Keras' own order (Conv2D: kernel, bias; DepthwiseConv2D: depthwise kernel;
BatchNormalization: gamma, beta, moving mean, moving variance; Dense: kernel, bias), the
arrays as Keras stores them (NHWC: kernels are ``[kh, kw, in, out]``). The model families
translate them (:mod:`mobilenet.models.keras_layouts`); this module knows no model.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike[str]

__all__ = ["HDF5_SIGNATURE", "ZIP_SIGNATURE", "keras_kind", "read_keras"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # a .keras file, or a PyTorch checkpoint
KERAS_WEIGHTS = "model.weights.h5"  # the weights inside a .keras zip


def keras_kind(path: PathLike) -> str | None:
    """``"h5"`` for an HDF5 file, ``"keras"`` for a ``.keras`` zip, else None."""
    path = Path(path)
    with path.open("rb") as f:
        head = f.read(8)
    if head == HDF5_SIGNATURE:
        return "h5"
    if head.startswith(ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(path) as z:
                return "keras" if KERAS_WEIGHTS in z.namelist() else None
        except (zipfile.BadZipFile, OSError):
            return None
    return None


def read_keras(path: PathLike) -> tuple[StateDict, dict[str, str]]:
    """The weights of a Keras file as ``{"<layer>/<i>": tensor}`` and its metadata
    (``keras_format``; ``keras_model``, the model's name, where the file has it)."""
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise CheckpointError(
            f'{path}: reading Keras files needs h5py: pip install "mobilenet[keras]"'
        ) from None
    kind = keras_kind(path)
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as z:
                data = z.read(KERAS_WEIGHTS)
                config = _json(z.read("config.json")) if "config.json" in z.namelist() else {}
            with h5py.File(io.BytesIO(data), "r") as f:
                state_dict, metadata = _read_h5(f, path)
            metadata["keras_format"] = "keras"
            if isinstance(config.get("config"), dict) and "name" in config["config"]:
                metadata["keras_model"] = str(config["config"]["name"])
        else:
            with h5py.File(path, "r") as f:
                state_dict, metadata = _read_h5(f, path)
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable Keras weights file ({detail})") from None
    if not state_dict:
        raise CheckpointError(f"{path}: a Keras file that holds no weights")
    return state_dict, metadata


def _read_h5(f: Any, path: Path) -> tuple[StateDict, dict[str, str]]:
    if "layer_names" in f.attrs:  # legacy save_weights, as keras.applications ships
        return _read_legacy(f, path), {"keras_format": "h5"}
    if "model_weights" in f:  # legacy model.save("x.h5")
        metadata = {"keras_format": "h5"}
        config = _json(f.attrs.get("model_config", "{}"))
        if isinstance(config.get("config"), dict) and "name" in config["config"]:
            metadata["keras_model"] = str(config["config"]["name"])
        return _read_legacy(f["model_weights"], path), metadata
    if "layers" in f:
        return _read_keras3(f["layers"], path), {"keras_format": "weights.h5"}
    raise CheckpointError(
        f"{path}: an HDF5 file without Keras weights (no layer_names, model_weights or layers)"
    )


def _read_legacy(group: Any, path: Path) -> StateDict:
    """Legacy layout: ``layer_names`` -> groups -> ``weight_names`` -> arrays."""
    state_dict: StateDict = {}
    for layer in map(_text, group.attrs["layer_names"]):
        g = group[layer]
        for i, weight in enumerate(map(_text, g.attrs.get("weight_names", []))):
            state_dict[f"{layer}/{i}"] = _tensor(g[weight], path, f"{layer}/{weight}")
    return state_dict


def _read_keras3(layers: Any, path: Path) -> StateDict:
    """Keras 3 layout: ``layers/<key>/vars/<i>``, the layer's name an attribute of vars."""
    state_dict: StateDict = {}
    for key in layers:
        group = layers[key]
        variables = group.get("vars") if hasattr(group, "get") else None
        if variables is None or not len(variables):
            continue
        layer = _text(variables.attrs.get("name", key))
        for i in sorted(variables, key=_index):
            state_dict[f"{layer}/{int(i)}"] = _tensor(variables[i], path, f"{layer}/{i}")
    return state_dict


def _index(name: str) -> int:
    if not name.isdigit():
        raise ValueError(f"unexpected variable {name!r} in a Keras 3 weights file")
    return int(name)


def _tensor(dataset: Any, path: Path, where: str) -> torch.Tensor:
    """A numeric array of the file as a tensor; anything else is refused."""
    if not hasattr(dataset, "dtype") or dataset.dtype.kind not in "fiu":
        raise CheckpointError(f"{path}: {where} is not a numeric array")
    return torch.from_numpy(np.array(dataset[()], copy=True))


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _json(text: Any) -> dict[str, Any]:
    try:
        found = json.loads(_text(text))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
