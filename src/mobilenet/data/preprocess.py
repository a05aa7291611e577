"""The evaluation preprocessing that travels with a checkpoint.

A checkpoint's published accuracy holds only for the preprocessing it was evaluated with:
the shorter side the image is resized to, the centre crop, the interpolation, and the
mean and standard deviation it is normalised with. torchvision's V2 weights resize to 232
before the 224 crop, its V1 weights to 256; timm's use ``crop_pct`` and often bicubic
interpolation; the Keras weights expect pixels in [-1, 1]. :class:`Preprocess` holds
these settings; our files keep it as JSON under the metadata key ``"preprocess"`` (the
safetensors that ``save_weights``, ``convert`` and ``train`` write, and the ONNX, ``.pt2``,
``.pte`` and ``.tflite`` files of ``export``).

The JSON form (one object; every key but ``mean`` and ``std`` may be left out)::

    {
      "name": "mobilenet_v2.tv2_in1k",  # where the settings come from (free text)
      "resolution": 224,                 # the centre crop = the network's input: N or [H, W]
      "resize": 232,                     # the shorter side before the crop, in pixels ...
      "crop_pct": null,                  # ... or the crop's share of it (timm):
                                         #     resize = floor(resolution / crop_pct)
      "interpolation": "bilinear",       # "bilinear" | "bicubic" | "nearest"
      "antialias": true,                 # antialiased downscaling (PIL always is)
      "mean": [0.485, 0.456, 0.406],     # per RGB channel, on pixels scaled to [0, 1]
      "std": [0.229, 0.224, 0.225]       # mean 0.5, std 0.5: the Keras/TF [-1, 1] range
    }

At most one of ``resize`` and ``crop_pct`` is given (neither: ``crop_pct`` 0.875, the
ImageNet convention of 256 -> 224). Left out, ``resolution`` is the checkpoint's own;
``interpolation`` is bilinear; ``antialias`` true. Unknown keys are refused, so a typo
is not silently ignored.

The transform resizes a PIL image with PIL (as torchvision's ``weights.transforms()`` and
timm's ``create_transform`` do when given one) and a tensor with torchvision's tensor
kernels, then crops, scales to [0, 1] and normalises.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError, MobileNetError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INTERPOLATIONS", "Preprocess", "ours"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DEFAULT_CROP_PCT = 0.875  # 224 of 256: the ImageNet evaluation convention since AlexNet

Size = int | tuple[int, int]


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, crop the centre ``resolution``, scale to [0, 1], normalise.

    The resize is ``resize`` pixels when given, else ``floor(side / crop_pct)`` for the
    longer side of the crop (timm's rule); see the module docstring for the JSON form.
    """

    resolution: Size = 224
    resize: int | None = None
    crop_pct: float | None = DEFAULT_CROP_PCT
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    name: str = "ours"

    def __post_init__(self) -> None:
        _check(self)

    @property
    def crop(self) -> tuple[int, int]:
        """The crop as ``(height, width)``."""
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])

    @property
    def resize_size(self) -> int:
        """The shorter side of the image before the crop."""
        if self.resize is not None:
            return self.resize
        assert self.crop_pct is not None
        return math.floor(max(self.crop) / self.crop_pct)

    def replace(self, **changes: Any) -> Preprocess:
        """A copy with ``changes`` (checked); ``resize`` given replaces ``crop_pct`` and
        the other way round."""
        if changes.get("resize") is not None:
            changes.setdefault("crop_pct", None)
        if changes.get("crop_pct") is not None:
            changes.setdefault("resize", None)
        return dataclasses.replace(self, **changes)

    def at(self, resolution: Size) -> Preprocess:
        """The same preprocessing for another input size: a ``crop_pct`` stays as it is;
        an explicit ``resize`` scales with the crop (232 for 224 is 265 for 256)."""
        if resolution == self.resolution:
            return self
        changes: dict[str, Any] = {"resolution": resolution}
        if self.resize is not None:
            new = resolution if isinstance(resolution, int) else max(resolution)
            changes["resize"] = round(self.resize * new / max(self.crop))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["resolution"] = self.resolution if isinstance(self.resolution, int) else list(self.crop)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], resolution: Size | None = None) -> Preprocess:
        """From the JSON object (see the module docstring); ``resolution`` when it has none."""
        if not isinstance(d, Mapping):
            raise MobileNetError("preprocess must be a JSON object")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise MobileNetError(f"preprocess has unknown keys: {', '.join(map(str, unknown))}")
        for key in ("mean", "std"):
            if key not in d:
                raise MobileNetError(f"preprocess has no {key!r}")
        values = dict(d)
        if values.get("resize") is not None and "crop_pct" not in values:
            values["crop_pct"] = None
        if "resolution" not in values and resolution is not None:
            values["resolution"] = resolution
        for key in ("mean", "std", "resolution"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str, where: str, resolution: Size | None = None) -> Preprocess:
        """From the metadata of ``where`` (a file, named in the one-line error)."""
        try:
            return cls.from_dict(json.loads(text), resolution)
        except ValueError as e:  # MobileNetError is a ValueError, so is a JSON error
            raise CheckpointError(f"{where}: metadata 'preprocess' is damaged: {e}") from None

    def describe(self) -> str:
        """One line: where the settings come from and what they are."""
        h, w = self.crop
        crop = str(h) if h == w else f"{h}x{w}"
        how = f"shorter side {self.resize_size}"
        if self.resize is None:
            how = f"crop_pct {self.crop_pct:g} ({how})"
        aa = "" if self.antialias or self.interpolation == "nearest" else ", no antialias"
        return (
            f"{self.name}: {how}, centre crop {crop}, "
            f"{self.interpolation}{aa}, mean {_floats(self.mean)}, std {_floats(self.std)}"
        )

    def transform(self):
        """The torchvision (v2) transform: a PIL image or uint8 ``[3, H, W]`` tensor in, a
        normalised float32 ``[3, *crop]`` tensor out."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        mode = InterpolationMode(self.interpolation)
        h, w = self.crop
        return v2.Compose(
            [
                v2.Resize(self.resize_size, interpolation=mode, antialias=self.antialias),
                v2.CenterCrop([h, w]),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(self.mean), list(self.std)),
            ]
        )


def _floats(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _check(p: Preprocess) -> None:
    """Refuse settings no transform can follow, in one line."""
    r = p.resolution
    sides = [r] if isinstance(r, int) else list(r) if isinstance(r, tuple) else []
    if len(sides) not in (1, 2) or not all(_is_int(s) and s >= 1 for s in sides):
        raise MobileNetError(f"preprocess resolution must be N or [H, W] > 0, got {r!r}")
    if p.resize is not None and p.crop_pct is not None:
        raise MobileNetError("preprocess takes resize or crop_pct, not both")
    if p.resize is not None and not (_is_int(p.resize) and p.resize >= max(sides)):
        raise MobileNetError(
            f"preprocess resize must be an integer >= the crop ({max(sides)}), got {p.resize!r}"
        )
    if p.resize is None:
        crop_pct = p.crop_pct if p.crop_pct is not None else DEFAULT_CROP_PCT
        if not (_is_number(crop_pct) and 0 < crop_pct <= 1):
            raise MobileNetError(f"preprocess crop_pct must be in (0, 1], got {crop_pct!r}")
        object.__setattr__(p, "crop_pct", float(crop_pct))
    for key in ("mean", "std"):
        v = getattr(p, key)
        if not (isinstance(v, tuple | list) and len(v) == 3 and all(map(_is_number, v))):
            raise MobileNetError(f"preprocess {key} must be 3 numbers (R, G, B), got {v!r}")
        object.__setattr__(p, key, tuple(float(x) for x in v))
    if not all(s > 0 for s in p.std):
        raise MobileNetError(f"preprocess std must be > 0, got {list(p.std)}")
    if p.interpolation not in INTERPOLATIONS:
        raise MobileNetError(
            f"preprocess interpolation must be one of {', '.join(INTERPOLATIONS)}, "
            f"got {p.interpolation!r}"
        )
    if not isinstance(p.antialias, bool) or not isinstance(p.name, str):
        raise MobileNetError("preprocess antialias must be true or false, and name a string")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def ours(resolution: int, crop_pct: float = DEFAULT_CROP_PCT, **kwargs: Any) -> Preprocess:
    """What our training recipes evaluate with: the shorter side resized to
    ``round(resolution / crop_pct)`` (256 for 224, 55 for the demo's 48), bilinear,
    ImageNet mean and std (``kwargs`` may change them, as a model's own config does)."""
    return Preprocess(resolution, resize=round(resolution / crop_pct), crop_pct=None, **kwargs)
