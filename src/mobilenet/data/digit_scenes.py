"""What the built-in detection and segmentation sets share: MNIST digits pasted on photo
textures (``mnist-det``, ``mnist-seg``).

The textures are scikit-image's sample photographs; the digits are MNIST's, shuffled
once, the training split drawn from the classification task's training digits and the
validation split from its held-out ones, so no digit of a validation image was seen in
training. Each set writes its own images and labels (:func:`write_digit_splits` calls it
once per split) into a temporary folder renamed into place, so an interrupted run leaves
nothing half-made.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .datasets import BUILTIN

__all__ = ["TEXTURES", "textures", "write_digit_splits"]

TEXTURES = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "coffee",
    "rocket",
)

# (folder, count, digits, labels, textures, rng): writes one split
SplitWriter = Callable[
    [Path, int, np.ndarray, np.ndarray, list[np.ndarray], np.random.Generator], None
]


def textures(purpose: str) -> list[np.ndarray]:
    """The :data:`TEXTURES` as HxWx3 uint8 arrays (scikit-image, the ``detection`` extra)."""
    from ..extras import require

    skimage_data = require("skimage.data", "detection", purpose)
    out = []
    for name in TEXTURES:
        image = getattr(skimage_data, name)()
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(image[..., :3]))
    return out


def write_digit_splits(
    root: Path,
    purpose: str,
    images: tuple[int, int],
    seed: int,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    write_split: SplitWriter,
) -> Path:
    """``root/train`` and ``root/val`` of ``images`` (train, val) images each, written by
    ``write_split`` from MNIST's digits (``prepare`` turns the ``[N, 1, 28, 28]`` uint8
    digits into what it pastes) with random generators seeded ``seed`` and ``seed + 1``."""
    digits, labels = BUILTIN["mnist"][0]()
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
    digits, labels = prepare(digits[order]).numpy(), labels[order].numpy()
    held_out = BUILTIN["mnist"][1]  # the classification task's held-out digits
    scenes = textures(purpose)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        parts = {
            "train": (images[0], slice(0, len(digits) - held_out), seed),
            "val": (images[1], slice(len(digits) - held_out, None), seed + 1),
        }
        for split, (count, pool, split_seed) in parts.items():
            rng = np.random.default_rng(split_seed)
            write_split(tmp / split, count, digits[pool], labels[pool], scenes, rng)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
