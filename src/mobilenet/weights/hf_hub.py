"""Checkpoints named by a Hugging Face Hub id: ``hf-hub:timm/mobilenetv3_large_100.ra_in1k``.

The files come through ``huggingface_hub`` (the ``hub`` extra), with its cache
(``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), its own file locks and its offline mode
(``HF_HUB_OFFLINE=1``: only what is cached is read). Two files of a repo are read, and
never a pickle:

* ``config.json``, timm's model config: ``architecture``, ``num_classes``, ``label_names``
  and the ``pretrained_cfg`` the weights were evaluated with (``input_size``,
  ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``, ``test_input_size``,
  ``test_crop_pct``). Each value is type-checked and bounded (:func:`read_hub_config`);
  nothing in it is evaluated, and none of it is used as a path.
* ``model.safetensors``, the weights, fetched at the commit the config came from. A repo
  that has only ``pytorch_model.bin`` (a pickle) is refused.

Every failure is one :class:`~mobilenet.CheckpointError` line: a file missing from the
cache while ``HF_HUB_OFFLINE`` is set, an unreachable hub, an unknown repo or revision.
This module knows no model: :mod:`mobilenet.models.pretrained` maps timm's architecture to
ours and writes the weights with their card (:func:`write_hub_checkpoint`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load

from ..errors import CheckpointError, MobileNetError
from ..fileio import read_bytes, write_bytes
from .io import FORMAT, sealed_safetensors

__all__ = [
    "HUB_PREFIX",
    "HubConfig",
    "HubId",
    "fetch_hub_config",
    "fetch_hub_weights",
    "hub_offline",
    "is_hub_id",
    "parse_hub_id",
    "read_hub_config",
    "write_hub_checkpoint",
]

HUB_PREFIX = "hf-hub:"
INSTALL_HINT = 'pip install "mobilenet[hub]"'
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.pth")
# timm's largest configs (ImageNet-21k, with label descriptions) are a few MB; the largest
# MobileNet's weights (MobileNetV4-Hybrid-L) about 150 MB.
MAX_CONFIG_BYTES = 16 << 20
MAX_WEIGHTS_BYTES = 1 << 30
# An input side below the command line's least (32) or beyond the card's bound is damage.
MIN_SIDE, MAX_SIDE = 32, 16384
MAX_CLASSES = 100_000  # ImageNet-21k has 21,843; a billion would be damage, not a dataset
MAX_LABEL_CHARS = 1000
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# timm's defaults (timm.data.resolve_data_config) for what a config leaves out
TIMM_DEFAULTS: dict[str, Any] = {
    "input_size": [3, 224, 224],
    "crop_pct": 0.875,
    "crop_mode": "center",
    "interpolation": "bicubic",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# model_args that leave the network as timm's registered architecture builds it
NEUTRAL_MODEL_ARGS = ("in_chans", "num_classes", "global_pool", "drop_rate", "drop_path_rate")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_ARCHITECTURE = re.compile(r"[A-Za-z0-9_.-]{1,100}")

Refuse = Callable[[str], CheckpointError]  # a reason -> the one-line error naming the file


@dataclass(frozen=True)
class HubId:
    """``hf-hub:ORG/NAME`` or ``hf-hub:ORG/NAME@REVISION`` (a branch, tag or commit)."""

    org: str
    name: str
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}"

    @property
    def model(self) -> str:
        """The model part of a timm repo's name: ``mobilenetv3_large_100`` of
        ``mobilenetv3_large_100.ra_in1k``."""
        return self.name.partition(".")[0]

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{HUB_PREFIX}{self.repo_id}{at}"


def is_hub_id(spec: object) -> bool:
    """Whether ``spec`` names a checkpoint on the Hugging Face Hub (``hf-hub:...``)."""
    return isinstance(spec, str) and spec.startswith(HUB_PREFIX)


def parse_hub_id(spec: str) -> HubId:
    """``hf-hub:ORG/NAME[@REVISION]`` -> :class:`HubId`; anything else is one line."""
    repo, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    org, _, name = repo.partition("/")
    parts_ok = all(_REPO_PART.fullmatch(p) and ".." not in p for p in (org, name))
    if not parts_ok or (revision and not _REVISION.fullmatch(revision)) or "@" in revision:
        raise MobileNetError(
            f"{spec[:200]!r} is not a hub id: hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION "
            "(hf-hub:timm/mobilenetv3_large_100.ra_in1k)"
        )
    return HubId(org, name, revision or None)


@dataclass(frozen=True)
class HubConfig:
    """What a timm ``config.json`` says of its weights, checked (:func:`read_hub_config`)."""

    architecture: str  # timm's model name: "mobilenetv3_large_100"
    num_classes: int
    input_size: tuple[int, int]  # (height, width)
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    test_input_size: tuple[int, int] | None = None  # timm's larger test-time size
    test_crop_pct: float | None = None
    label_names: tuple[str, ...] | None = None

    def preprocess(self, name: str, test: bool = False) -> dict[str, Any]:
        """The evaluation preprocessing, in the JSON form of
        :class:`mobilenet.data.preprocess.Preprocess` (centre crop of ``crop_pct``); at the
        test size (``test``) when the config names one."""
        size = self.test_input_size if test and self.test_input_size else self.input_size
        crop = self.test_crop_pct if test and self.test_crop_pct is not None else self.crop_pct
        return {
            "name": name,
            "resolution": size[0] if size[0] == size[1] else list(size),
            "crop_pct": crop,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def read_hub_config(data: bytes, where: str) -> HubConfig:
    """A timm ``config.json`` (``pretrained_cfg`` inside, or the older flat form), its
    values checked and bounded; damage is one :class:`CheckpointError` naming ``where``."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{where}: {CONFIG_FILE} {why}")

    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise bad(f"is not JSON ({str(e)[:80]})") from None
    if not isinstance(config, dict):
        raise bad("is not a JSON object")
    cfg = config.get("pretrained_cfg", config)  # timm's older configs are flat
    if not isinstance(cfg, dict):
        raise bad("'pretrained_cfg' is not a JSON object")
    cfg = {**TIMM_DEFAULTS, **cfg}
    architecture = config.get("architecture")
    if not (isinstance(architecture, str) and _ARCHITECTURE.fullmatch(architecture)):
        raise bad(f"names no timm architecture (got {str(architecture)[:60]!r})")
    _check_model_args(config.get("model_args"), bad)
    if cfg["crop_mode"] != "center":
        raise bad(f"crop_mode {str(cfg['crop_mode'])[:40]!r}: only 'center' is followed")
    if cfg["interpolation"] not in INTERPOLATIONS:
        why = f"interpolation {str(cfg['interpolation'])[:40]!r} is not one of {INTERPOLATIONS}"
        raise bad(why)
    num_classes = _count(config.get("num_classes", cfg.get("num_classes", 1000)), bad)
    test_size, test_crop = cfg.get("test_input_size"), cfg.get("test_crop_pct")
    if test_size is not None:
        test_size = _input_size(test_size, "test_input_size", bad)
    return HubConfig(
        architecture=architecture,
        num_classes=num_classes,
        input_size=_input_size(cfg["input_size"], "input_size", bad),
        crop_pct=_fraction(cfg["crop_pct"], "crop_pct", bad),
        interpolation=cfg["interpolation"],
        mean=_triple(cfg["mean"], "mean", bad),
        std=_triple(cfg["std"], "std", bad, positive=True),
        test_input_size=test_size,
        test_crop_pct=None if test_crop is None else _fraction(test_crop, "test_crop_pct", bad),
        label_names=_labels(config.get("label_names", cfg.get("label_names")), num_classes, bad),
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    # an int of hundreds of digits is a number too (math.isfinite would overflow on it)
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _check_model_args(args: object, bad: Refuse) -> None:
    if args is None:
        return
    if not isinstance(args, dict):
        raise bad("'model_args' is not a JSON object")
    other = sorted(str(k)[:40] for k in args if k not in NEUTRAL_MODEL_ARGS)
    if other:
        raise bad(f"model_args {', '.join(other[:5])} change timm's model; not built here")
    if args.get("in_chans", 3) != 3:
        raise bad(f"model_args in_chans {str(args['in_chans'])[:20]}: MobileNets take RGB (3)")
    if args.get("global_pool", "avg") != "avg":
        raise bad(f"model_args global_pool {str(args['global_pool'])[:20]!r}: ours is 'avg'")


def _count(value: object, bad: Refuse) -> int:
    if not (_is_int(value) and 1 <= value <= MAX_CLASSES):  # type: ignore[operator]
        raise bad(f"num_classes must be an integer in [1, {MAX_CLASSES}], got {str(value)[:40]}")
    return value  # type: ignore[return-value]


def _input_size(value: object, key: str, bad: Refuse) -> tuple[int, int]:
    ok = isinstance(value, list) and len(value) == 3 and all(map(_is_int, value))
    if not ok or value[0] != 3:  # type: ignore[index]
        raise bad(f"{key} must be [3, height, width], got {str(value)[:60]}")
    height, width = value[1], value[2]  # type: ignore[index]
    if not (MIN_SIDE <= height <= MAX_SIDE and MIN_SIDE <= width <= MAX_SIDE):
        shown = f"{str(height)[:20]}x{str(width)[:20]}"
        raise bad(f"{key} {shown} is not an input size ({MIN_SIDE} to {MAX_SIDE})")
    if height != width:
        raise bad(f"{key} {height}x{width}: a classifier's input is square")
    return height, width


def _fraction(value: object, key: str, bad: Refuse) -> float:
    if not (_is_number(value) and 0 < value <= 1):  # type: ignore[operator]
        raise bad(f"{key} must be a number in (0, 1], got {str(value)[:40]}")
    return float(value)  # type: ignore[arg-type]


def _triple(
    value: object, key: str, bad: Refuse, positive: bool = False
) -> tuple[float, float, float]:
    ok = isinstance(value, list) and len(value) == 3 and all(map(_is_number, value))
    if not ok or (positive and min(value) <= 0) or max(map(abs, value)) > 1e3:  # type: ignore
        bound = "> 0 and <= 1000" if positive else "within +-1000"
        raise bad(f"{key} must be 3 numbers {bound}, got {str(value)[:60]}")
    return float(value[0]), float(value[1]), float(value[2])  # type: ignore[index]


def _labels(value: object, num_classes: int, bad: Refuse) -> tuple[str, ...] | None:
    """timm's ``label_names``: a list, or a dict of class index -> name without gaps."""
    if value is None:
        return None
    if isinstance(value, dict) and len(value) == num_classes:
        keys = {str(i) for i in range(num_classes)}
        value = [value[k] for k in sorted(keys, key=int)] if set(value) == keys else None
    ok = isinstance(value, list) and len(value) == num_classes
    if not ok or not all(isinstance(n, str) and len(n) <= MAX_LABEL_CHARS for n in value):
        raise bad(f"label_names must be {num_classes} names (one per class)")
    return tuple(value)  # type: ignore[arg-type]


def _hub() -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants  # an attribute only once imported (lazy package)
    except ImportError:
        raise MobileNetError(f"hf-hub: checkpoints need huggingface_hub: {INSTALL_HINT}") from None
    return huggingface_hub


def hub_offline() -> bool:
    """Whether the hub may not be asked: ``HF_HUB_OFFLINE`` set, whether ``huggingface_hub``
    read it when imported or it was set since."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in ("1", "ON", "YES", "TRUE") or bool(_hub().constants.HF_HUB_OFFLINE)


def _download(hub_id: HubId, filename: str, revision: str | None) -> Path:
    """One file of the repo through ``huggingface_hub`` (its cache, locks, offline mode)."""
    hub = _hub()
    offline = hub_offline()
    try:
        path = hub.hf_hub_download(
            hub_id.repo_id, filename, revision=revision, local_files_only=offline
        )
    except Exception as e:  # the hub's own and its HTTP client's: all reported in one line
        raise _fetch_error(e, hub_id, filename, revision, offline) from None
    return Path(path)


def _fetch_error(
    e: Exception, hub_id: HubId, filename: str, revision: str | None, offline: bool
) -> CheckpointError:
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = _hub().constants.HF_HUB_CACHE
    if isinstance(e, LocalEntryNotFoundError):  # before EntryNotFoundError: a subclass
        if filename == WEIGHTS_FILE and (pickle := _cached_pickle(hub_id, revision)):
            return _pickle_only(hub_id, pickle)
        if offline:
            return CheckpointError(
                f"{hub_id}: {filename} is not in the Hugging Face cache ({cache}) and "
                "HF_HUB_OFFLINE is set: fetch it once online, or unset HF_HUB_OFFLINE"
            )
        cause = e.__cause__ or e.__context__
        reason = _first_line(cause) if cause is not None else "the network failed"
        return CheckpointError(
            f"{hub_id}: could not reach the Hugging Face Hub for {filename}, and it is not in "
            f"the cache ({cache}): {reason}"
        )
    if isinstance(e, EntryNotFoundError):
        if filename == WEIGHTS_FILE:
            return _pickle_only(hub_id, None)
        return CheckpointError(f"{hub_id} has no {filename}: not a timm checkpoint")
    if isinstance(e, GatedRepoError):
        return CheckpointError(f"{hub_id} is gated: accept its terms on the hub and log in")
    if isinstance(e, RepositoryNotFoundError):
        return CheckpointError(f"{hub_id}: no such repository on the hub (or a private one)")
    if isinstance(e, RevisionNotFoundError):
        return CheckpointError(f"{hub_id}: no revision {revision} in {hub_id.repo_id}")
    return CheckpointError(f"{hub_id}: could not fetch {filename}: {_first_line(e)}")


def _cached_pickle(hub_id: HubId, revision: str | None) -> str | None:
    for name in PICKLE_FILES:
        found = _hub().try_to_load_from_cache(hub_id.repo_id, name, revision=revision)
        if isinstance(found, str):
            return name
    return None


def _pickle_only(hub_id: HubId, pickle: str | None) -> CheckpointError:
    has = f"only {pickle}, a pickle," if pickle else f"no {WEIGHTS_FILE}"
    return CheckpointError(
        f"{hub_id} has {has} and pickled weights are not read from the hub: only its {WEIGHTS_FILE}"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{what}: cannot be read ({e.strerror or e})") from None
    if size > limit:
        raise CheckpointError(f"{what} is {size:,} bytes, beyond the {limit:,} read")
    return read_bytes(path, what)


def fetch_hub_config(hub_id: HubId) -> tuple[str, HubConfig]:
    """The repo's ``config.json``, read and checked, and the commit it came from (so that
    the weights come from the same one)."""
    path = _download(hub_id, CONFIG_FILE, hub_id.revision)
    # huggingface_hub returns snapshots/<commit>/config.json
    commit = path.parent.name if _COMMIT.fullmatch(path.parent.name) else hub_id.revision
    data = _bounded(path, MAX_CONFIG_BYTES, f"{hub_id}: {CONFIG_FILE}")
    return commit or "main", read_hub_config(data, str(hub_id))


def fetch_hub_weights(hub_id: HubId, commit: str) -> Path:
    """The repo's ``model.safetensors`` at ``commit`` (a pickle-only repo is refused)."""
    return _download(hub_id, WEIGHTS_FILE, commit)


def write_hub_checkpoint(
    weights: Path, metadata: Mapping[str, str], target: Path, where: str
) -> Path:
    """The hub's tensors, unchanged, as our safetensors with ``metadata`` (the card) and a
    seal, written atomically to ``target``. The hub's file must be safetensors."""
    what = f"{where}: {WEIGHTS_FILE}"
    data = _bounded(weights, MAX_WEIGHTS_BYTES, what)
    size = int.from_bytes(data[:8], "little") if len(data) >= 9 else 0
    if not (0 < size <= len(data) - 8 and data[8:9] == b"{"):
        raise CheckpointError(f"{what} is not a safetensors file, and nothing else is read")
    try:
        tensors = load(data)  # checks the header against the file before using it
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{what} is not a readable safetensors file ({e})") from None
    if not tensors:
        raise CheckpointError(f"{what} holds no tensors")
    write_bytes(target, sealed_safetensors(tensors, {**metadata, "format": FORMAT}))
    return target
