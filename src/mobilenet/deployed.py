"""What every loaded model shares: the result of a load (:class:`Trained`) and the
checks that hold a file's model card to the model it describes.

The formats (:mod:`mobilenet.formats`) read their files into a runnable model and a
:class:`~mobilenet.card.ModelCard`; the checks here refuse a card that contradicts its
program or the command line, in one line naming the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import Category, ModelCard
from .data.imagenet import default_classes
from .data.preprocess import Preprocess
from .errors import CheckpointError, MobileNetError
from .models import ModelConfig

__all__ = [
    "Trained",
    "check_images",
    "check_requested",
    "checked_classes",
    "classifier_config",
    "exported_card",
    "output_count",
    "require_task",
]


@dataclass
class Trained:
    """A runnable model with its card: what every loader returns, for every task (the
    formats' ``load``, :func:`~mobilenet.classification.predict.load_trained`,
    :func:`~mobilenet.detection.predict.load_detector`,
    :func:`~mobilenet.segmentation.predict.load_segmenter`).

    ``classes`` names the model's outputs: a classifier's logits, a segmentation model's
    classes (0 the background), a detector's categories (label i is ``classes[i - 1]``,
    its dataset id ``card.category_ids[i - 1]``). ``card``: the facts its file keeps.
    """

    model: nn.Module  # a MobileNet, a DeployedModel, an SSDLite, a segmentation model
    classes: list[str]
    resolution: int | tuple[int, int]  # the input size: a side, or (height, width)
    path: Path | None = None  # the weights file it came from
    preprocess: Preprocess | None = None  # None: ours, from the model's eval_config
    card: ModelCard | None = None

    @property
    def task(self) -> str:
        """The model's task: its own (every model class names one), else its card's."""
        own = getattr(self.model, "task", None)
        return own or (self.card.task if self.card is not None else "classification")

    @property
    def size(self) -> tuple[int, int]:
        """The input ``(height, width)``."""
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        return self.resolution[0], self.resolution[1]

    @property
    def categories(self) -> list[Any]:
        """A detector's categories (:class:`~mobilenet.card.Category`): label i
        is ``categories[i - 1]``, with its dataset id (the card's ``category_ids``, else
        1, 2, ...: torchvision's COCO labels are the ids)."""

        kept = self.card.category_ids if self.card is not None else None
        ids = kept or range(1, len(self.classes) + 1)
        return [Category(i, name) for i, name in zip(ids, self.classes, strict=True)]

    def name_of(self, label: int) -> str:
        """A detector's label as a name (label 0 is the background; an unknown one its
        number)."""
        return self.classes[label - 1] if 0 < label <= len(self.classes) else str(label)

    def eval_preprocess(self) -> Preprocess:
        """A classifier's preprocessing, at its input resolution."""
        from .data.published import model_preprocess

        if self.preprocess is not None:
            return self.preprocess.at(self.resolution)
        return model_preprocess(self.model, self.resolution)

    def model_card(self) -> ModelCard:
        """The card a file written from this classifier keeps: its config, task, classes,
        input size and preprocessing (precision and quantization are the writer's to add)."""
        card = self.card or ModelCard()
        return card.replace(
            config=self.model.config.to_dict(),
            task=self.task,
            classes=self.classes,
            input_size=self.size,
            preprocess=self.eval_preprocess(),
            extra={},
        )


def require_task(card: ModelCard, path: Path, task: str, noun: str) -> None:
    """Refuse a file whose card names another task than the one its reader reads
    (``noun``: what that reader takes, "a classifier")."""
    if card.task != task:
        raise MobileNetError(f"{path} holds a {card.task} model, not {noun}")


def check_requested(
    path: Path, config: Mapping[str, Any], model: str | None, width_mult: float | None
) -> None:
    """Refuse a ``--model`` or ``--width-mult`` that contradicts the model a file names in
    its ``config``; one that agrees is no error (it says nothing new)."""
    name, width = config.get("name"), config.get("width_mult", 1.0)
    if model is not None and model != name:
        raise MobileNetError(f"{path} holds {name}, not {model}")
    known = isinstance(width, (int, float))
    if width_mult is not None and known and not math.isclose(width_mult, width, rel_tol=1e-9):
        raise MobileNetError(f"{path} holds {name} at width {width}, not {width_mult}")


def checked_classes(
    card: ModelCard, path: Path, num_classes: int, outputs: int | None = None
) -> list[str]:
    """The class names of a file that holds a model of ``num_classes`` (its config's, or
    its tensors'), whose program gives ``outputs`` logits (None: not known): its card's
    names, else numbered ones (ImageNet's for 1,000). A card that contradicts the program
    is damage, refused at load: names of another count would be shifted or cut, and a
    wrong class count scores every image against the wrong logits."""
    if outputs is not None and outputs != num_classes:
        raise CheckpointError(
            f"{path}: metadata 'config' says {num_classes} classes; the program outputs "
            f"{outputs} logits"
        )
    if not card.classes:  # none kept ("null" or an empty list)
        return default_classes(num_classes)
    if len(card.classes) != num_classes:
        raise CheckpointError(
            f"{path}: metadata 'classes' lists {len(card.classes)} classes; the model has "
            f"{num_classes}"
        )
    return list(card.classes)


def classifier_config(card: ModelCard, path: Path) -> ModelConfig:
    """The classifier config a card keeps, as the model's own type."""
    if card.config is None:
        raise CheckpointError(f"{path}: metadata has no model 'config'")
    try:
        config = ModelConfig(**card.config)
    except TypeError as e:  # unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    if not isinstance(config.num_classes, int) or config.num_classes < 1:
        raise CheckpointError(f"{path}: metadata 'config' says {config.num_classes!r} classes")
    return config


def exported_card(
    metadata: Mapping[str, str],
    path: Path,
    model: str | None = None,
    width_mult: float | None = None,
    resolution: int | None = None,
) -> tuple[ModelCard, ModelConfig, int]:
    """The card of an exported classifier (``.onnx``, ``.pt2``, ``.pte``, ``.tflite``, an
    IR), its config and its square input side, refused when the command line asks for
    another model, width or size."""
    card = ModelCard.read(metadata, str(path))
    require_task(card, path, "classification", "a classifier")
    config = classifier_config(card, path)
    check_requested(path, card.config or {}, model, width_mult)
    if card.input_size is None or card.resolution is None:
        size = "none" if card.input_size is None else "x".join(map(str, card.input_size))
        raise CheckpointError(
            f"{path}: metadata 'resolution' must be a positive integer, got {size!r}"
        )
    if resolution is not None and resolution != card.resolution:
        res = card.resolution
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    return card, config, card.resolution


def check_images(x: torch.Tensor, resolution: int) -> None:
    """Refuse a batch an exported program was not made for, before it runs."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, resolution, resolution) or x.shape[0] < 1:
        raise MobileNetError(
            f"the exported program takes (batch, 3, {resolution}, {resolution}) images, "
            f"not {tuple(x.shape)}"
        )


def output_count(run: Callable[[torch.Tensor], Any], path: Path, res: int) -> int:
    """How many logits a program (``run``: a batch in, logits out) gives, from one run on
    a blank image at the size its metadata names: the runtimes' readers do not expose the
    declared output shape. One image, once per load: small beside any evaluation."""
    try:
        out = run(torch.zeros(1, 3, res, res))
    except MobileNetError:
        raise
    except Exception as e:  # the runtimes raise their own types on a shape they refuse
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: the program does not run on the {res}x{res} images its metadata "
            f"names ({first})"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"{path}: the program's output {shape} is not (batch, logits)")
    return int(out.shape[1])
