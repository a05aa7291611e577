"""The preprocessing each published checkpoint was evaluated with, and how a checkpoint's
is chosen.

* torchvision: ``weights.transforms()`` of each weight enum (``ImageClassification``:
  resize the shorter side to ``resize_size``, centre-crop 224, bilinear, antialias,
  ImageNet mean and std): 256 for the V1 weights, 232 for the V2 ones
  (``MobileNet_V2_Weights.IMAGENET1K_V2``: "resize_size=232"). Keys as in
  :data:`mobilenet.models.pretrained.PRETRAINED`.
* timm: the ``pretrained_cfg`` of each tag timm has weights for (``input_size``,
  ``crop_pct``, ``interpolation``, ``mean``, ``std``), as ``resolve_data_config`` gives
  them (the train-size evaluation; timm's ``test_input_size`` is noted where there is one).
* Keras (``keras.applications`` MobileNet V1, V2, V3): pixels in [-1, 1] (mean 0.5, std
  0.5 on [0, 1]), with the TF-slim evaluation crop of 87.5%.
* ours: what our recipes evaluate with (:func:`~.preprocess.ours`).

Every torchvision and timm entry is checked pixel for pixel against the library's own
transform by ``tests/test_preprocess.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from ..errors import MobileNetError
from .preprocess import Preprocess, ours

__all__ = [
    "KNOWN",
    "TIMM_DEFAULTS",
    "TORCHVISION_FILES",
    "attach_preprocess",
    "checkpoint_preprocess",
    "known",
    "model_preprocess",
]

_TIMM_RA: dict[str, Any] = {"crop_pct": 0.875, "interpolation": "bicubic"}
_HALF: dict[str, Any] = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def _entries() -> dict[str, Preprocess]:
    tv = {
        "mobilenet_v2.tv_in1k": 256,
        "mobilenet_v2.tv2_in1k": 232,
        "mobilenet_v3_large.tv_in1k": 256,
        "mobilenet_v3_large.tv2_in1k": 232,
        "mobilenet_v3_small.tv_in1k": 256,
    }
    timm: dict[str, dict[str, Any]] = {
        # timm's test_input_size 256 with test_crop_pct 0.95 (v1_100) or 1.0 (the others)
        "mobilenetv1_100.ra4_e3600_r224_in1k": {"crop_pct": 0.875, **_HALF},
        "mobilenetv1_125.ra4_e3600_r224_in1k": {"crop_pct": 0.9, **_HALF},
        "mobilenetv3_large_100.ra4_e3600_r224_in1k": {"crop_pct": 0.95, **_HALF},
        "mobilenetv2_050.lamb_in1k": _TIMM_RA,
        "mobilenetv2_100.ra_in1k": _TIMM_RA,
        "mobilenetv2_140.ra_in1k": _TIMM_RA,
        "mobilenetv3_large_100.ra_in1k": _TIMM_RA,
        "mobilenetv3_large_100.miil_in21k_ft_in1k": {
            "crop_pct": 0.875,
            "interpolation": "bilinear",
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
        },
        "mobilenetv3_small_050.lamb_in1k": _TIMM_RA,
        "mobilenetv3_small_075.lamb_in1k": _TIMM_RA,
        "mobilenetv3_small_100.lamb_in1k": _TIMM_RA,
    }
    found = {
        k: Preprocess(224, resize=r, crop_pct=None, interpolation="bilinear", name=k)
        for k, r in tv.items()
    }
    for k, v in timm.items():
        found[k] = Preprocess(224, name=k, **{"interpolation": "bicubic", **v})
    found["imagenet"] = Preprocess(224, name="imagenet")  # crop_pct 0.875, bilinear
    found["torchvision"] = Preprocess(224, resize=256, crop_pct=None, name="torchvision")
    found["keras"] = Preprocess(224, name="keras", mean=(0.5,) * 3, std=(0.5,) * 3)
    return found


KNOWN: dict[str, Preprocess] = _entries()

# torchvision's file names (which carry a SHA-256 prefix) -> their weights' preprocessing.
TORCHVISION_FILES = {
    "mobilenet_v2-b0353104.pth": "mobilenet_v2.tv_in1k",
    "mobilenet_v2-7ebf99e0.pth": "mobilenet_v2.tv2_in1k",
    "mobilenet_v3_large-8738ca79.pth": "mobilenet_v3_large.tv_in1k",
    "mobilenet_v3_large-5c1a4163.pth": "mobilenet_v3_large.tv2_in1k",
    "mobilenet_v3_small-047dcff4.pth": "mobilenet_v3_small.tv_in1k",
}

# A timm state dict does not say which tag it is: (our model, width) -> timm's default tag.
TIMM_DEFAULTS = {
    ("mobilenet_v1", 1.0): "mobilenetv1_100.ra4_e3600_r224_in1k",
    ("mobilenet_v1", 1.25): "mobilenetv1_125.ra4_e3600_r224_in1k",
    ("mobilenet_v2", 0.5): "mobilenetv2_050.lamb_in1k",
    ("mobilenet_v2", 1.0): "mobilenetv2_100.ra_in1k",
    ("mobilenet_v2", 1.4): "mobilenetv2_140.ra_in1k",
    ("mobilenet_v3_large", 1.0): "mobilenetv3_large_100.ra_in1k",
    ("mobilenet_v3_small", 0.5): "mobilenetv3_small_050.lamb_in1k",
    ("mobilenet_v3_small", 0.75): "mobilenetv3_small_075.lamb_in1k",
    ("mobilenet_v3_small", 1.0): "mobilenetv3_small_100.lamb_in1k",
}


def known(name: str) -> Preprocess:
    """A known preprocessing by name (``mobilenet_v2.tv2_in1k``, ``keras``, ...)."""
    if name not in KNOWN:
        raise MobileNetError(f"unknown preprocessing {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def checkpoint_preprocess(
    metadata: Mapping[str, str],
    source: str,
    layout: str,
    model: str,
    width_mult: float,
    default: Preprocess,
    settings: Mapping[str, Any] | None = None,
) -> Preprocess:
    """The preprocessing a checkpoint was evaluated with, first found of: its metadata
    (``"preprocess"``); what its layout says of it (``settings``, the ``"preprocess"`` of
    ``Layout.settings``: the authors' TF checkpoints take [-1, 1]); torchvision's file
    name; the default tag of a timm layout; the layout's library (torchvision, Keras);
    else ``default`` (ours)."""
    res = default.resolution
    if "preprocess" in metadata:
        return Preprocess.from_json(metadata["preprocess"], source, res)
    if settings is not None:
        given = {"crop_pct": 0.875, "name": f"{layout} (TF)", **settings}
        return Preprocess.from_dict(given, res)
    name = TORCHVISION_FILES.get(PurePath(source).name)
    if name is None and layout == "timm":
        name = TIMM_DEFAULTS.get((model, round(width_mult, 4)))
        if name is None:  # timm has no weights of this width: its models' defaults
            return Preprocess(res, name="timm default")
    if name is None and layout in ("torchvision", "keras"):
        name = layout
    return KNOWN[name] if name is not None else default


def model_preprocess(model: Any, resolution: int | None = None) -> Preprocess:
    """The preprocessing to evaluate ``model`` with: the one it was loaded with
    (``model.preprocess``, set by ``create_model(name, weights=...)``), else ours from its
    ``eval_config``; at ``resolution`` when given."""
    found = getattr(model, "preprocess", None)
    if not isinstance(found, Preprocess):
        config = getattr(model, "eval_config", None)
        if config is None:  # a model without its own settings: ours at their defaults
            return ours(resolution or 224)
        found = ours(
            resolution or config.resolution,
            config.crop_pct,
            mean=config.mean,
            std=config.std,
            interpolation=config.interpolation,
        )
    return found if resolution is None else found.at(resolution)


def attach_preprocess(
    model: Any,
    metadata: Mapping[str, str],
    source: str,
    layout: str,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Set ``model.preprocess`` to the checkpoint's (see :func:`checkpoint_preprocess`);
    ``settings``: what the layout says of it."""
    saved = metadata.get("resolution", "")
    resolution = int(saved) if saved.isdigit() and int(saved) > 0 else None
    default = model_preprocess(model, resolution)
    config = model.config
    model.preprocess = checkpoint_preprocess(
        metadata, source, layout, config.name, config.width_mult, default, settings
    )
