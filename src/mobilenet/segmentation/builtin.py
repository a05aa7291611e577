"""The built-in segmentation set ``mnist-seg``, and where a segmentation dataset is.

``mnist-seg`` is generated once, deterministically, into the cache
(``$MOBILENET_HOME/datasets``), the way ``mnist-det`` is: digits of the built-in MNIST
subset, made bold, pasted at random scales and places onto 128x128 crops of real texture
photos that scikit-image ships (brick, grass, gravel, ...), one to four digits per image,
each in a colour that contrasts with the background under it. Train and held-out images
use disjoint digits (the held-out images use the 1,000 digits the classification task
holds out).

The masks: 11 classes, 0 = background and ``d + 1`` = digit ``d``. A digit is pasted as
an opacity map ``a``: its 28x28 MNIST grey levels after a 3x3 maximum filter (strokes one
pixel thicker on each side), divided by 255 and resized bilinearly to the pasted size
(40 to 96 pixels square). Each pixel becomes ``(1 - a) * background + a * colour``, and a pixel
belongs to the digit exactly where ``a >= 0.5``, i.e. where the digit's colour makes up
at least half of it. A later digit covers an earlier one where they overlap (digits
overlap little: at most 10% of the smaller square). No pixel is 255.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.digit_scenes import write_digit_splits
from ..errors import MobileNetError
from .data import CLASSES_FILE, palette

__all__ = ["BUILTIN_SEGMENTATION", "dataset_root", "make_mnist_seg"]

BUILTIN_SEGMENTATION = ("mnist-seg",)
MNIST_SEG_VERSION = 1  # bump when the generator changes: the cache folder is keyed on it
IMAGE_SIZE = 128
DIGIT_SIZES = (40, 96)  # pixels of a digit's 28x28 cell, log-uniform
DIGITS_PER_IMAGE = (1, 4)  # tried; fewer where a digit finds no free place
OPACITY = 0.5  # a pixel is the digit's where its opacity is at least this
TRAIN_IMAGES, VAL_IMAGES = 6_000, 500
CLASSES = ["background", *(str(d) for d in range(10))]


def dataset_root(data: str, split: str = "train") -> tuple[Path, str]:
    """``(folder, split)``: ``data`` itself, or a built-in set's split folder (generated
    into the cache the first time)."""
    if data == "mnist-seg":
        from ..paths import cache_dir

        base = cache_dir() / "datasets" / f"mnist-seg-v{MNIST_SEG_VERSION}"
        if not (base / "val" / CLASSES_FILE).is_file():
            make_mnist_seg(base)
        return base / split, split
    if not Path(data).is_dir():
        raise MobileNetError(
            f"data not found: {data} (a segmentation folder, or one of: "
            f"{', '.join(BUILTIN_SEGMENTATION)})"
        )
    return Path(data), split


def make_mnist_seg(
    root: str | Path,
    train_images: int = TRAIN_IMAGES,
    val_images: int = VAL_IMAGES,
    seed: int = 0,
) -> Path:
    """Write the digits-segmentation set to ``root/{train,val}`` (``images/*.jpg``,
    ``masks/*.png`` palette PNGs, ``classes.txt``).

    Deterministic for a given ``seed``; written into a temporary folder and renamed, so
    an interrupted run leaves nothing half-made.
    """
    return write_digit_splits(
        Path(root), "the mnist-seg dataset", (train_images, val_images), seed, bold, _write_split
    )


def bold(digits: torch.Tensor) -> torch.Tensor:
    """MNIST digits ``[N, 1, 28, 28]`` (uint8) with strokes one pixel thicker on each side:
    a 3x3 maximum filter, so the masks of a stride-8 network's size are not hairlines."""
    return F.max_pool2d(digits.float(), 3, stride=1, padding=1)[:, 0].to(torch.uint8)


def _write_split(
    folder: Path,
    count: int,
    digits: np.ndarray,
    labels: np.ndarray,
    textures: list[np.ndarray],
    rng: np.random.Generator,
) -> None:
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    colours = [v for rgb in palette() for v in rgb]
    for index in range(1, count + 1):
        canvas, mask = _compose(digits, labels, textures, rng)
        Image.fromarray(canvas).save(folder / "images" / f"{index:05d}.jpg", quality=92)
        indexed = Image.fromarray(mask)
        indexed.putpalette(colours)  # mode P, the values kept: VOC's mask format
        indexed.save(folder / "masks" / f"{index:05d}.png")
    (folder / CLASSES_FILE).write_text("\n".join(CLASSES) + "\n")


def _compose(
    digits: np.ndarray, labels: np.ndarray, textures: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One image and its mask: a random texture crop (random tint) and 1-4 digits that
    overlap little."""
    texture = textures[rng.integers(len(textures))]
    y0 = rng.integers(texture.shape[0] - IMAGE_SIZE + 1)
    x0 = rng.integers(texture.shape[1] - IMAGE_SIZE + 1)
    canvas = texture[y0 : y0 + IMAGE_SIZE, x0 : x0 + IMAGE_SIZE].astype(np.float32)
    canvas = np.clip(canvas * rng.uniform(0.6, 1.2, size=3), 0, 255)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    squares: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(DIGITS_PER_IMAGE[0], DIGITS_PER_IMAGE[1] + 1))):
        for _attempt in range(20):
            size = int(np.exp(rng.uniform(*np.log(DIGIT_SIZES))))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
            if all(_overlap((x, y, size), s) < 0.1 for s in squares):
                break
        else:
            continue
        squares.append((x, y, size))
        index = int(rng.integers(len(digits)))
        cell = Image.fromarray(digits[index]).resize((size, size), Image.BILINEAR)
        alpha = np.asarray(cell, dtype=np.float32) / 255
        region = canvas[y : y + size, x : x + size]
        # a colour far from the background under the digit
        colour = rng.uniform(0, 70, 3) if region.mean() > 110 else rng.uniform(185, 255, 3)
        weight = alpha[..., None]
        canvas[y : y + size, x : x + size] = region * (1 - weight) + colour * weight
        mask[y : y + size, x : x + size][alpha >= OPACITY] = int(labels[index]) + 1
    return canvas.round().astype(np.uint8), mask


def _overlap(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    """Intersection of two squares ``(x, y, side)`` over the smaller one."""
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min(a[2], b[2]) ** 2
