"""torchvision transforms v2 pipelines for training and evaluation (the evaluation
pipeline itself is :meth:`.preprocess.Preprocess.transform`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import InterpolationMode, v2

from ..errors import MobileNetError
from .preprocess import Preprocess, ours

__all__ = ["Augment", "eval_transform", "train_transform"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random-resized crop, flip and the recipe's extras."""

    crop_scale: tuple[float, float] = (0.08, 1.0)  # Inception-style crop (Szegedy et al.)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None  # "trivialaugment" | "autoaugment" | "randaugment"
    random_erasing: float = 0.0


def _auto_augment(name: str | None) -> list[v2.Transform]:
    if name is None:
        return []
    if name == "trivialaugment":
        return [v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)]
    if name == "autoaugment":
        return [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, InterpolationMode.BILINEAR)]
    if name == "randaugment":  # Cubuk et al. 2020: 2 ops at magnitude 9 (MobileNetV4's)
        return [v2.RandAugment(2, 9, interpolation=InterpolationMode.BILINEAR)]
    raise MobileNetError(f"unknown auto-augment policy {name!r}")


def train_transform(resolution: int, augment: Augment, config: Any) -> v2.Compose:
    """``config``: anything with ``mean`` and ``std`` (a model's ``eval_config``)."""
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            resolution, scale=augment.crop_scale, ratio=augment.crop_ratio, antialias=True
        ),
    ]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(augment.hflip))
    steps += _auto_augment(augment.auto_augment)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(config.mean, config.std)]
    if augment.random_erasing > 0:
        steps.append(v2.RandomErasing(augment.random_erasing, value=0))
    return v2.Compose(steps)


def eval_transform(resolution: int, config: Any) -> v2.Compose:
    """The evaluation transform at ``resolution``: ``config`` a :class:`Preprocess` (its
    settings at that size), or a model's ``eval_config`` (ours: the shorter side resized
    to ``round(resolution / crop_pct)``, then the central ``resolution`` square)."""
    if not isinstance(config, Preprocess):
        config = ours(
            resolution,
            config.crop_pct,
            mean=config.mean,
            std=config.std,
            interpolation=config.interpolation,
        )
    return config.at(resolution).transform()
