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

A weights file is data, so nothing in it may make the reader reach outside it or allocate
without bound. Before any array is read, every object the reader walks to is checked:

* links: a hard link is followed, a soft link only to a place inside the file (resolved
  one name at a time, at most :data:`MAX_SOFT_LINKS` deep); an external link (another
  file) is refused, and so are arrays that keep their data elsewhere: external storage
  (raw bytes of a local file) and virtual datasets (arrays of other HDF5 files). HDF5
  would otherwise read any file the user can read, and ``convert`` would save it as a
  "weight";
* sizes: HDF5 declares a shape without storing it (unwritten storage reads as the fill
  value), so a 9 KB file can declare a 4 TiB array. An array stored raw must hold every
  byte it declares (the bytes HDF5 allocated for it); a compressed one may declare at most
  :data:`MAX_COMPRESSION` times what it stores (deflate's own limit); no array may
  declare more than :data:`MAX_ARRAY_BYTES` and all together no more than
  :data:`MAX_WEIGHTS_BYTES`; an array reached by a second name is refused (Keras writes
  each weight once, and N names for one array would allocate it N times);
* a ``.keras`` zip: its members are read by name into memory, nothing is extracted, so
  a member's path cannot lead anywhere; the weights member may declare at most
  :data:`MAX_WEIGHTS_BYTES` uncompressed and at most :data:`MAX_COMPRESSION` times its
  compressed size (``zipfile`` never inflates past the declared size).
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike[str]

__all__ = [
    "HDF5_SIGNATURE",
    "MAX_ARRAY_BYTES",
    "MAX_COMPRESSION",
    "MAX_WEIGHTS_BYTES",
    "ZIP_SIGNATURE",
    "keras_kind",
    "read_keras",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"  # a .keras file, or a PyTorch checkpoint
KERAS_WEIGHTS = "model.weights.h5"  # the weights inside a .keras zip
KERAS_CONFIG = "config.json"
# The largest tensor of any MobileNet is a classifier: 1280 features x 1,000 classes is
# 5 MB in float32, an ImageNet-21k head (21,843 classes) 112 MB; 1 GiB leaves a margin of 9.
MAX_ARRAY_BYTES = 1 << 30
# The largest MobileNet (V4 hybrid large, 38M parameters) is 150 MB in float32.
MAX_WEIGHTS_BYTES = 4 << 30
# Deflate cannot shrink data more than about 1032:1; other HDF5 filters do no better on
# weights. Beyond it a "compressed" array is a bomb.
MAX_COMPRESSION = 1032
MAX_CONFIG_BYTES = 16 << 20  # a .keras config.json (a MobileNet's is about 100 KB)
MAX_SOFT_LINKS = 8  # hops through soft links to reach one object


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
                data = _member(z, KERAS_WEIGHTS, MAX_WEIGHTS_BYTES, path)
                config = {}
                if KERAS_CONFIG in z.namelist():
                    config = _json(_member(z, KERAS_CONFIG, MAX_CONFIG_BYTES, path))
            with h5py.File(io.BytesIO(data), "r") as f:
                state_dict, metadata = _read_h5(f, _Budget(path, len(data)))
            metadata["keras_format"] = "keras"
            if isinstance(config.get("config"), dict) and "name" in config["config"]:
                metadata["keras_model"] = str(config["config"]["name"])
        else:
            with h5py.File(path, "r") as f:
                state_dict, metadata = _read_h5(f, _Budget(path, path.stat().st_size))
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable Keras weights file ({detail})") from None
    if not state_dict:
        raise CheckpointError(f"{path}: a Keras file that holds no weights")
    return state_dict, metadata


def _member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A member of a ``.keras`` zip, refused before it is inflated when it declares more
    than ``limit`` bytes or more than :data:`MAX_COMPRESSION` times its compressed size."""
    info = z.getinfo(name)
    if info.file_size > limit or info.file_size > MAX_COMPRESSION * max(info.compress_size, 1):
        raise CheckpointError(
            f"{path}: its {name} declares {info.file_size:,} bytes from "
            f"{info.compress_size:,} compressed, more than a Keras file holds; refused"
        )
    return z.read(name)


class _Budget:
    """What the arrays read from one file may allocate (see the module docstring), and
    the arrays already taken, by HDF5 object: a second name for one is refused."""

    def __init__(self, path: Path, file_size: int) -> None:
        self.path, self.file_size = path, file_size
        self.total = 0
        self.seen: dict[Any, str] = {}

    def take(self, dataset: Any, where: str) -> None:
        """Refuse, in one line, an array whose data lie outside the file or whose declared
        size cannot be right; count it otherwise. Nothing of its data is read."""
        path = self.path
        if dataset.is_virtual:
            raise CheckpointError(
                f"{path}: {where} is a virtual dataset (its data would be read from other "
                "files); refused"
            )
        if dataset.external:
            raise CheckpointError(
                f"{path}: {where} keeps its data in another file ({dataset.external[0][0]}); "
                "refused"
            )
        if dataset.dtype.kind not in "fiu" or dataset.shape is None:  # None: no dataspace
            raise CheckpointError(f"{path}: {where} is not a numeric array")
        if (other := self.seen.get(dataset.id)) is not None:
            raise CheckpointError(f"{path}: {where} is the same array as {other}; refused")
        self.seen[dataset.id] = where
        declared = math.prod(dataset.shape) * dataset.dtype.itemsize  # Python ints
        stored = dataset.id.get_storage_size()
        compressed = dataset.id.get_create_plist().get_nfilters() > 0
        limit = min(MAX_ARRAY_BYTES, MAX_COMPRESSION * stored if compressed else stored)
        if declared > limit:
            shape = "x".join(map(str, dataset.shape))
            held = f"{stored:,} bytes {'compressed' if compressed else 'stored'}"
            raise CheckpointError(
                f"{path}: {where} declares a {shape} {dataset.dtype} array of {declared:,} "
                f"bytes, with {held} in a file of {self.file_size:,}: it cannot be a weight; "
                "refused"
            )
        self.total += declared
        if self.total > MAX_WEIGHTS_BYTES:
            raise CheckpointError(
                f"{path}: its arrays declare more than {MAX_WEIGHTS_BYTES:,} bytes in all, "
                "more than any MobileNet holds; refused"
            )


def _node(group: Any, name: str, budget: _Budget, hops: int = 0) -> Any:
    """``group[name]`` reached one name at a time: hard links are followed, soft links
    only inside the file, external links (another file) refused."""
    import h5py

    node = group.file if name.startswith("/") else group
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if not isinstance(node, h5py.Group):
            raise KeyError(f"{node.name} is not a group, so it has no {part!r}")
        link = node.get(part, getlink=True)
        if link is None:
            raise KeyError(f"no {part!r} in {node.name}")
        if isinstance(link, h5py.ExternalLink):
            raise CheckpointError(
                f"{budget.path}: {node.name.rstrip('/')}/{part} links to another file "
                f"({link.filename}); refused"
            )
        if isinstance(link, h5py.SoftLink):
            if hops >= MAX_SOFT_LINKS:
                raise CheckpointError(
                    f"{budget.path}: {node.name.rstrip('/')}/{part}: more than "
                    f"{MAX_SOFT_LINKS} soft links to follow; refused"
                )
            node = _node(node, link.path, budget, hops + 1)
        else:
            node = node[part]
    return node


def _has(group: Any, name: str) -> bool:
    """Whether ``group`` has a link ``name``, without following it."""
    return group.get(name, getlink=True) is not None


def _read_h5(f: Any, budget: _Budget) -> tuple[StateDict, dict[str, str]]:
    if "layer_names" in f.attrs:  # legacy save_weights, as keras.applications ships
        return _read(_legacy_arrays(f, budget), budget), {"keras_format": "h5"}
    if _has(f, "model_weights"):  # legacy model.save("x.h5")
        metadata = {"keras_format": "h5"}
        config = _json(f.attrs.get("model_config", "{}"))
        if isinstance(config.get("config"), dict) and "name" in config["config"]:
            metadata["keras_model"] = str(config["config"]["name"])
        weights = _node(f, "model_weights", budget)
        return _read(_legacy_arrays(weights, budget), budget), metadata
    if _has(f, "layers"):
        layers = _node(f, "layers", budget)
        return _read(_keras3_arrays(layers, budget), budget), {"keras_format": "weights.h5"}
    raise CheckpointError(
        f"{budget.path}: an HDF5 file without Keras weights (no layer_names, model_weights "
        "or layers)"
    )


Arrays = list[tuple[str, Any, str]]  # (state dict key, h5py dataset, its place in messages)


def _legacy_arrays(group: Any, budget: _Budget) -> Arrays:
    """Legacy layout: ``layer_names`` -> groups -> ``weight_names`` -> arrays."""
    arrays = []
    for layer in map(_text, group.attrs["layer_names"]):
        g = _node(group, layer, budget)
        for i, weight in enumerate(map(_text, g.attrs.get("weight_names", []))):
            arrays.append((f"{layer}/{i}", _node(g, weight, budget), f"{layer}/{weight}"))
    return arrays


def _keras3_arrays(layers: Any, budget: _Budget) -> Arrays:
    """Keras 3 layout: ``layers/<key>/vars/<i>``, the layer's name an attribute of vars."""
    import h5py

    arrays = []
    for key in layers:
        group = _node(layers, key, budget)
        if not isinstance(group, h5py.Group) or not _has(group, "vars"):
            continue
        variables = _node(group, "vars", budget)
        if not isinstance(variables, h5py.Group) or not len(variables):
            continue
        layer = _text(variables.attrs.get("name", key))
        for i in sorted(variables, key=_index):
            arrays.append((f"{layer}/{int(i)}", _node(variables, i, budget), f"{layer}/{i}"))
    return arrays


def _index(name: str) -> int:
    if not name.isdigit():
        raise ValueError(f"unexpected variable {name!r} in a Keras 3 weights file")
    return int(name)


def _read(arrays: Arrays, budget: _Budget) -> StateDict:
    """Every array checked first (:meth:`_Budget.take`), then read."""
    import h5py

    for _, dataset, where in arrays:
        if not isinstance(dataset, h5py.Dataset):
            raise CheckpointError(f"{budget.path}: {where} is not a numeric array")
        budget.take(dataset, where)
    return {key: _tensor(dataset) for key, dataset, _ in arrays}


def _tensor(dataset: Any) -> torch.Tensor:
    """A checked array of the file as a tensor, in native byte order."""
    array = np.asarray(dataset[()])
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(array))


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _json(text: Any) -> dict[str, Any]:
    try:
        found = json.loads(_text(text))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
