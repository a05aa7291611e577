"""Weights: read the checkpoints people already have, write our own safetensors.

:func:`load_weights` accepts, recognised by their keys:

* torchvision state dicts: ``mobilenet_v2``, ``mobilenet_v3_large``, ``mobilenet_v3_small``
  (the ``.pth`` files torchvision downloads, or ``model.state_dict()`` saved by a user);
* timm state dicts: ``mobilenetv1_{100,125}``, ``mobilenetv2_{035,050,075,100,140}``,
  ``mobilenetv3_large_{075,100}``, ``mobilenetv3_small_{050,075,100}`` (``.pth``,
  ``.bin`` or ``model.safetensors`` from the Hugging Face hub, or a timm training
  checkpoint holding ``state_dict``);
* our own safetensors files, written by :func:`save_weights`, which carry the model's
  config as metadata;
* for the SSDLite detectors: torchvision's ``ssdlite320_mobilenet_v3_large`` state dicts
  and our own files (see :mod:`mobilenet.detection.weights`).

Pickled files are opened with ``torch.load(weights_only=True)`` only: tensors and plain
containers, never arbitrary objects. A checkpoint that does not fit the model is refused
before anything is copied, with the missing, unexpected and mis-shaped tensors named.

Each source trained with its own BatchNorm epsilon (torchvision's V3: 1e-3; torchvision's
V2 and timm: PyTorch's default 1e-5); loading sets it, so outputs match the source exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .blocks import DepthwiseSeparable, InvertedResidual
from .errors import CheckpointError
from .fileio import atomic_write
from .layers import ConvBNAct
from .models.base import MobileNet, ModelConfig

__all__ = [
    "PRETRAINED",
    "Pretrained",
    "detect_source",
    "download",
    "infer_num_classes",
    "list_pretrained",
    "load_weights",
    "read_checkpoint",
    "resolve_weights",
    "save_weights",
    "saved_config",
]

StateDict = dict[str, torch.Tensor]
PathLike = str | os.PathLike[str]

FORMAT = "mobilenet"  # metadata["format"] of our safetensors files
PYTORCH_BN_EPS = 1e-5
TORCHVISION_V3_BN_EPS = 1e-3


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: PathLike) -> tuple[StateDict, dict[str, str]]:
    """Read a state dict and its metadata from safetensors or a (weights-only) pickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad or unsafe pickle
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (safetensors, or a PyTorch state dict "
            f"loadable with weights_only=True): {first_line}"
        ) from None
    return _unwrap(obj, path), {}


def _is_safetensors(path: Path) -> bool:
    # An 8-byte little-endian header length, then a JSON header starting with "{".
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


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


# --------------------------------------------------------------------------- sources


def detect_source(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Which library wrote a state dict: ``"mobilenet"``, ``"torchvision"`` or ``"timm"``."""
    if "features.0.conv.weight" in state_dict:
        return "mobilenet"
    if "features.0.0.weight" in state_dict:
        return "torchvision"
    if "conv_stem.weight" in state_dict:
        return "timm"
    sample = ", ".join(list(state_dict)[:3])
    raise CheckpointError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected a MobileNet "
        "state dict from this toolkit, torchvision or timm"
    )


def _source_bn_eps(source: str, state_dict: Mapping[str, torch.Tensor]) -> float | None:
    if source == "torchvision":
        is_v3 = any(".block." in k for k in state_dict)
        return TORCHVISION_V3_BN_EPS if is_v3 else PYTORCH_BN_EPS
    if source == "timm":
        return PYTORCH_BN_EPS
    return None


def _conv_bn(prefix: str, rest: str) -> str:
    """torchvision's Conv2dNormActivation ("0." conv, "1." bn) -> our ConvBNAct names."""
    index, _, tail = rest.partition(".")
    return f"{prefix}{ {'0': 'conv', '1': 'bn'}.get(index, index) }.{tail}"


def _present(block: InvertedResidual) -> list[str]:
    names = ["expand", "dw", "se", "project"]
    return [n for n in names if not isinstance(getattr(block, n), nn.Identity)]


def _from_torchvision(state_dict: StateDict, model: MobileNet) -> StateDict:
    out: StateDict = {}
    is_v3 = any(".block." in k for k in state_dict)
    for key, tensor in state_dict.items():
        new = key
        m = re.fullmatch(r"features\.(\d+)\.(.+)", key)
        if m and int(m[1]) < len(model.features):
            prefix, rest = f"features.{m[1]}.", m[2]
            layer = model.features[int(m[1])]
            if isinstance(layer, ConvBNAct):
                new = _conv_bn(prefix, rest)
            elif isinstance(layer, InvertedResidual):
                new = _torchvision_block(prefix, rest, layer)
        elif key.startswith("classifier."):
            index, _, tail = key.removeprefix("classifier.").partition(".")
            # V2: [Dropout, Linear]; V3: [Linear, Hardswish, Dropout, Linear]
            names = {"0": "pre_logits.fc", "3": "classifier"} if is_v3 else {"1": "classifier"}
            new = f"{names.get(index, 'classifier.' + index)}.{tail}"
        out[new] = tensor
    return out


def _torchvision_block(prefix: str, rest: str, block: InvertedResidual) -> str:
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
        return f"{prefix}{name}.{tail}" if name == "se" else _conv_bn(f"{prefix}{name}.", tail)
    # V2: [expand?, dw] as Conv2dNormActivation, then the projection's conv and bn.
    convs = [n for n in _present(block) if n in ("expand", "dw")]
    if j < len(convs):
        return _conv_bn(f"{prefix}{convs[j]}.", tail)
    plain = {len(convs): "project.conv", len(convs) + 1: "project.bn"}
    return f"{prefix}{plain.get(j, seq + '.' + index)}.{tail}"


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


def _from_timm(state_dict: StateDict, model: MobileNet) -> StateDict:
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


_TRANSLATORS = {"torchvision": _from_torchvision, "timm": _from_timm}


# --------------------------------------------------------------------------- load / save


def infer_num_classes(state_dict: Mapping[str, torch.Tensor], name: str = "checkpoint") -> int:
    """Number of classes of a checkpoint's classifier, in any supported layout."""
    source = detect_source(state_dict)
    candidates = {
        "mobilenet": ["classifier.weight"],
        "timm": ["classifier.weight"],
        "torchvision": ["classifier.3.weight", "classifier.1.weight"],
    }[source]
    for key in candidates:
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return 0  # saved without a classifier


def load_weights(
    model: MobileNet,
    checkpoint: PathLike | Mapping[str, torch.Tensor],
    source_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Load a checkpoint into ``model`` in place; returns the detected source.

    ``checkpoint`` is a path (safetensors, or a pickled state dict read with
    ``weights_only=True``) or an in-memory state dict (with the ``metadata`` read along
    with it, if any). Raises
    :class:`~mobilenet.CheckpointError` naming the missing, unexpected and mis-shaped
    tensors when it does not fit; the model is then left untouched.
    """
    from .detection.model import SSDLite

    state_dict, metadata, name = read_state_dict(checkpoint, source_name, metadata)
    if isinstance(model, SSDLite):  # detectors: torchvision's SSDLite layout, or ours
        from .detection.weights import load_detector_weights

        return load_detector_weights(model, state_dict, name, metadata)
    source = detect_source(state_dict)
    fit_state_dict(
        model, state_dict, name, source, _saved_config(metadata),
        _source_bn_eps(source, state_dict), _TRANSLATORS.get(source),
    )  # fmt: skip
    return source


def read_state_dict(
    checkpoint: PathLike | Mapping[str, torch.Tensor],
    source_name: str | None,
    metadata: Mapping[str, str] | None,
) -> tuple[StateDict, Mapping[str, str], str]:
    """(state dict, metadata, a name for messages) of a path or an in-memory state dict."""
    if isinstance(checkpoint, Mapping):
        return dict(checkpoint), metadata or {}, source_name or "state dict"
    state_dict, metadata = read_checkpoint(checkpoint)
    return state_dict, metadata, source_name or str(checkpoint)


def fit_state_dict(
    model: nn.Module,
    state_dict: StateDict,
    name: str,
    source: str,
    saved: Any,
    bn_eps: float | None,
    translate: Callable[[StateDict, nn.Module], StateDict] | None,
) -> None:
    """Load ``state_dict`` from ``source`` into ``model``, all or nothing.

    Our own files (``source == "mobilenet"``) must have been saved from the same model
    (``saved``: their stored config) and bring their BatchNorm epsilon; other sources are
    translated to our names first. The fit is checked before anything is copied.
    """
    if source == "mobilenet":
        if saved is not None:
            if saved.name != model.config.name:
                raise CheckpointError(
                    f"{name} holds {saved.name} (width {saved.width_mult}), not {model.config.name}"
                )
            bn_eps = saved.bn_eps
    elif translate is not None:
        state_dict = translate(state_dict, model)
    _check_fits(model, state_dict, name, source)
    own = model.state_dict()
    # A checkpoint without BatchNorm step counters keeps the model's own.
    missing_counters = {k: own[k] for k in own if k not in state_dict}
    model.load_state_dict({**state_dict, **missing_counters}, strict=True)
    if bn_eps is not None:
        model.set_bn_eps(bn_eps)


def _check_fits(model: MobileNet, state_dict: StateDict, name: str, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if not (missing or unexpected or misshaped):
        return
    cfg = model.config
    lines = [
        f"{name} ({source} layout) does not fit {cfg.name} "
        f"(width {cfg.width_mult}, {cfg.num_classes} classes):"
    ]
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")
            lines.append(f"  {len(keys)} {label}: {shown}")
    if misshaped and all(k.startswith("classifier.") for k in misshaped):
        lines.append("  (only the classifier differs: pass the checkpoint's number of classes)")
    raise CheckpointError("\n".join(lines))


def _saved_config(metadata: Mapping[str, str]) -> ModelConfig | None:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        return None
    try:
        return ModelConfig(**json.loads(metadata["config"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"corrupt model config in checkpoint metadata: {e}") from None


def save_weights(
    model: MobileNet, path: PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write the model's weights as safetensors, its config as metadata; atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict()), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def saved_config(metadata: Mapping[str, str]) -> ModelConfig | None:
    """The model config stored in our safetensors metadata (None for other checkpoints)."""
    return _saved_config(metadata)


# --------------------------------------------------------------------------- official files


@dataclass(frozen=True)
class Pretrained:
    """An official checkpoint: where it lives, its SHA-256 (or a prefix of it), its model."""

    model: str
    url: str
    sha256: str
    top1: float  # ImageNet-1k top-1 reported by the publisher


PRETRAINED: dict[str, Pretrained] = {
    # torchvision's files carry the first 8 hex digits of their SHA-256 in their names.
    "mobilenet_v2.tv_in1k": Pretrained(
        "mobilenet_v2",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        "b0353104",
        71.878,
    ),
    "mobilenet_v2.tv2_in1k": Pretrained(
        "mobilenet_v2",
        "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        "7ebf99e0",
        72.154,
    ),
    "mobilenet_v3_large.tv_in1k": Pretrained(
        "mobilenet_v3_large",
        "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
        "8738ca79",
        74.042,
    ),
    "mobilenet_v3_large.tv2_in1k": Pretrained(
        "mobilenet_v3_large",
        "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
        "5c1a4163",
        75.274,
    ),
    "mobilenet_v3_small.tv_in1k": Pretrained(
        "mobilenet_v3_small",
        "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
        "047dcff4",
        67.668,
    ),
}


def list_pretrained(model: str | None = None) -> list[str]:
    """Names of the official checkpoints ``create_model(..., weights=NAME)`` can fetch."""
    return [k for k, v in PRETRAINED.items() if model is None or v.model == model]


def cache_dir() -> Path:
    return Path(os.environ.get("MOBILENET_HOME", Path.home() / ".cache" / "mobilenet"))


def download(url: str, sha256: str | None = None, directory: PathLike | None = None) -> Path:
    """Fetch ``url`` into the cache (once) and check its SHA-256 (or prefix) before use."""
    directory = Path(directory) if directory is not None else cache_dir()
    name = Path(urllib.parse.urlparse(url).path).name or "checkpoint"
    target = directory / name
    if target.is_file() and (sha256 is None or sha256_file(target).startswith(sha256)):
        return target

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url) as response, tmp.open("wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            raise CheckpointError(f"could not download {url}: {e}") from None
        if sha256 is not None and not (digest := sha256_file(tmp)).startswith(sha256):
            raise CheckpointError(
                f"{url}: SHA-256 {digest[:16]}... does not match the expected {sha256}"
            )

    atomic_write(target, fetch)
    return target


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights(spec: PathLike) -> Path:
    """A local path, a URL, or an official checkpoint name -> a local file."""
    spec = str(spec)
    if spec in PRETRAINED:
        entry = PRETRAINED[spec]
        return download(entry.url, entry.sha256)
    if re.match(r"^(https?|file)://", spec):
        return download(spec)
    return Path(spec)
