"""The model card: one typed record of what a model file holds, for every format.

A file keeps its model's facts as string key/values: safetensors metadata, ONNX
``metadata_props``, the extra file of a ``.pt2``, the constant method of a ``.pte``, the
metadata buffer of a ``.tflite``, an OpenVINO IR's ``rt_info``. :meth:`ModelCard.metadata`
is the one writer of those facts and :meth:`ModelCard.read` the one reader, so the
class names, the input size and the preprocessing are written and checked in one place.

The keys (card version 1)::

    card          "1"
    config        the model's config, a JSON object naming the model ("name")
    task          classification | detection | segmentation | encoder (features, no
                  classes: MobileNetV5's, ``num_classes`` 0)
    classes       a JSON list of class names (detection: of the categories, label i + 1)
    category_ids  detection: a JSON list of the categories' dataset ids
    resolution    the input size: "224" (square) or "512x1024" (height x width)
    preprocess    the evaluation preprocessing (mobilenet.data.preprocess.Preprocess)
    precision     float32 | int8
    quantization  int8 only: a JSON object (method, scheme, float_modules,
                  calibration_images, integer_only)
    origin        where the weights came from: a JSON object (layout, source)
    toolkit       the mobilenet version that wrote the file

Files written before the card (no ``card`` key) still read: their input size under
``image_size``, a detector's ``categories`` as ``[{"id", "name"}]`` and an int8
file's ``quantization`` as text (``fx-ptq``) are understood.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .data.preprocess import Preprocess
from .errors import CheckpointError

__all__ = ["CARD_KEYS", "CARD_VERSION", "TASKS", "Category", "ModelCard", "size_text"]

CARD_VERSION = 1
TASKS = ("classification", "detection", "segmentation", "encoder")
PRECISIONS = ("float32", "int8")
CARD_KEYS = (
    "card",
    "config",
    "task",
    "classes",
    "category_ids",
    "resolution",
    "preprocess",
    "precision",
    "quantization",
    "origin",
    "toolkit",
)
LEGACY_KEYS = ("image_size", "categories")
MAX_SIDE = 16384  # an input side beyond any MobileNet's: a damaged number, not a size
_SIZE = re.compile(r"(\d{1,5})(?:x(\d{1,5}))?")


def size_text(size: int | tuple[int, int] | list[int]) -> str:
    """An input size as the card writes it: ``224`` for a square, ``HxW`` otherwise."""
    if isinstance(size, int):
        return str(size)
    height, width = size
    return str(height) if height == width else f"{height}x{width}"


@dataclass(frozen=True, order=True)
class Category:
    """A detector's category: its dataset id (COCO's, say) and its name. A card keeps
    them as ``classes`` (label i + 1 is the i-th) and ``category_ids``."""

    id: int
    name: str


@dataclass(frozen=True)
class ModelCard:
    """What a model file holds. ``extra`` keeps the other key/values a file carries
    (its format's own, the epoch and metrics of a training run), passed through."""

    config: Mapping[str, Any] | None = None
    task: str = "classification"
    classes: tuple[str, ...] | None = None
    category_ids: tuple[int, ...] | None = None
    input_size: tuple[int, int] | None = None
    preprocess: Preprocess | None = None
    precision: str = "float32"
    quantization: Mapping[str, Any] | None = None
    origin: Mapping[str, Any] | None = None
    toolkit: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        """The model's registry name, when the card names one."""
        return None if self.config is None else self.config.get("name")

    @property
    def num_classes(self) -> int | None:
        value = None if self.config is None else self.config.get("num_classes")
        return value if isinstance(value, int) else None

    @property
    def resolution(self) -> int | None:
        """A square input's side (None for another shape or none kept)."""
        if self.input_size is None or self.input_size[0] != self.input_size[1]:
            return None
        return self.input_size[0]

    def replace(self, **changes: Any) -> ModelCard:
        if "classes" in changes and changes["classes"] is not None:
            changes["classes"] = tuple(changes["classes"])
        if isinstance(changes.get("input_size"), int):
            changes["input_size"] = (changes["input_size"],) * 2
        return dataclasses.replace(self, **changes)

    def metadata(self) -> dict[str, str]:
        """The card as string key/values: the one writer of a model's facts into a file."""
        meta = {k: v for k, v in self.extra.items() if k not in CARD_KEYS + LEGACY_KEYS}
        meta["card"] = str(CARD_VERSION)
        meta["task"] = self.task
        meta["precision"] = self.precision
        meta["toolkit"] = self.toolkit or toolkit_version()
        if self.config is not None:
            meta["config"] = json.dumps(dict(self.config))
        if self.classes is not None:
            meta["classes"] = json.dumps(list(self.classes))
        if self.category_ids is not None:
            meta["category_ids"] = json.dumps(list(self.category_ids))
        if self.input_size is not None:
            meta["resolution"] = size_text(self.input_size)
        if self.preprocess is not None:
            size = self.input_size if self.input_size is not None else None
            preprocess = self.preprocess if size is None else self.preprocess.at(_size(size))
            meta["preprocess"] = preprocess.to_json()
        if self.quantization is not None:
            meta["quantization"] = json.dumps(dict(self.quantization))
        if self.origin is not None:
            meta["origin"] = json.dumps(dict(self.origin))
        return meta

    @classmethod
    def read(cls, metadata: Mapping[str, str], where: str) -> ModelCard:
        """The card a file's metadata holds, validated: damage is one line naming
        ``where`` (the file). Keys a file does not keep stay None."""
        reader = _Reader(metadata, where)
        version = metadata.get("card")
        if version is not None and version != str(CARD_VERSION):
            raise CheckpointError(
                f"{where}: model card version {version[:20]!r} is not one this mobilenet "
                f"reads ({CARD_VERSION}): a newer mobilenet wrote it"
            )
        task = metadata.get("task", "classification")
        if task not in TASKS:
            raise CheckpointError(f"{where}: metadata 'task' {task[:40]!r} is not one of {TASKS}")
        precision = metadata.get("precision", "float32")
        if precision not in PRECISIONS:
            raise CheckpointError(f"{where}: metadata 'precision' {precision[:40]!r} is unknown")
        classes, ids = reader.classes()
        size = reader.input_size()
        return cls(
            config=reader.config(),
            task=task,
            classes=classes,
            category_ids=ids,
            input_size=size,
            preprocess=reader.preprocess(size),
            precision=precision,
            quantization=reader.quantization(),
            origin=reader.json_object("origin"),
            toolkit=metadata.get("toolkit"),
            extra={k: v for k, v in metadata.items() if k not in CARD_KEYS + LEGACY_KEYS},
        )


def toolkit_version() -> str:
    """The installed mobilenet's version (``unknown`` when run from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mobilenet")
    except PackageNotFoundError:
        return "unknown"


def _size(size: tuple[int, int]) -> int | tuple[int, int]:
    return size[0] if size[0] == size[1] else size


class _Reader:
    """The checks of :meth:`ModelCard.read`, one per key."""

    def __init__(self, metadata: Mapping[str, str], where: str) -> None:
        self.metadata = metadata
        self.where = where

    def damaged(self, key: str, why: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: metadata '{key}' {why}")

    def json(self, key: str) -> Any:
        try:
            return json.loads(self.metadata[key])
        except (ValueError, RecursionError) as e:
            raise self.damaged(key, f"is not JSON ({str(e)[:80]})") from None

    def json_object(self, key: str) -> dict[str, Any] | None:
        if key not in self.metadata:
            return None
        value = self.json(key)
        if not isinstance(value, dict):
            raise self.damaged(key, "is not a JSON object")
        return value

    def config(self) -> dict[str, Any] | None:
        config = self.json_object("config")
        if config is None:
            return None
        if not isinstance(config.get("name"), str):
            raise self.damaged("config", "names no model")
        count = config.get("num_classes")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise self.damaged("config", f"says {count!r} classes")
        if isinstance(count, int) and count < 0:  # 0: no classifier (an encoder)
            raise self.damaged("config", f"says {count} classes")
        return config

    def classes(self) -> tuple[tuple[str, ...] | None, tuple[int, ...] | None]:
        if self.metadata.get("classes") is not None:
            names = self.json("classes")
            if names is None:  # "null": no names kept
                return None, self.category_ids()
            if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
                raise self.damaged("classes", "is not a list of class names")
            return tuple(names), self.category_ids()
        if "categories" not in self.metadata:  # a detector's, before the card
            return None, None
        saved = self.json("categories")
        if isinstance(saved, list) and all(isinstance(c, str) for c in saved):
            return tuple(saved), None  # an exported detector's: names only
        ok = isinstance(saved, list) and all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("id"), int)
            and not isinstance(c.get("id"), bool)
            for c in saved
        )
        if not ok:
            raise self.damaged("categories", 'is not a list of {"id": int, "name": str}')
        return tuple(c["name"] for c in saved), tuple(c["id"] for c in saved)

    def category_ids(self) -> tuple[int, ...] | None:
        if "category_ids" not in self.metadata:
            return None
        ids = self.json("category_ids")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise self.damaged("category_ids", "is not a list of integers")
        return tuple(ids)

    def input_size(self) -> tuple[int, int] | None:
        key = "resolution" if "resolution" in self.metadata else "image_size"
        text = self.metadata.get(key)
        if text is None:
            return None
        match = _SIZE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            why = f"must be a positive integer or HxW, got {str(text)[:40]!r}"
            raise self.damaged(key, why)
        height = int(match.group(1))
        width = int(match.group(2) or height)
        if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
            raise self.damaged(key, f"{text!r} is not an input size (1 to {MAX_SIDE})")
        return height, width

    def preprocess(self, size: tuple[int, int] | None) -> Preprocess | None:
        if "preprocess" not in self.metadata:
            return None
        res = None if size is None else _size(size)
        preprocess = Preprocess.from_json(self.metadata["preprocess"], self.where, res)
        return preprocess if res is None else preprocess.at(res)

    def quantization(self) -> dict[str, Any] | None:
        text = self.metadata.get("quantization")
        if text is None:
            return None
        if text.startswith("{"):
            return self.json_object("quantization")
        return {"scheme": text}  # before the card: "fx-ptq", "fx-qat"
