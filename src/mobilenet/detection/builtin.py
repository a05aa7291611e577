"""The built-in detection set ``mnist-det``, and where a detection dataset's folder is.

``mnist-det`` is generated once, deterministically, into the cache
(``$MOBILENET_HOME/datasets``): digits of the built-in MNIST subset (5,000 digits, 10
classes) pasted at random scales and places onto 320x320 crops of real texture photos
that scikit-image ships (brick, grass, gravel, ...), one to six digits per image, each
in a colour that contrasts with the background under it. Train and held-out images use
disjoint digits (the held-out images use the 1,000 digits the classification task
holds out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.digit_scenes import write_digit_splits
from ..errors import MobileNetError
from .data import ANNOTATIONS

__all__ = ["BUILTIN_DETECTION", "dataset_root", "make_mnist_det"]

BUILTIN_DETECTION = ("mnist-det",)
MNIST_DET_VERSION = 2  # bump when the generator changes: the cache folder is keyed on it
IMAGE_SIZE = 320
DIGIT_SIZES = (40, 128)  # pixels of a digit's 28x28 cell, log-uniform
TRAIN_IMAGES, VAL_IMAGES = 10_000, 500  # v1: 4,000 training images (overfitted in 12 epochs)


def dataset_root(data: str, split: str = "train") -> Path:
    """A folder holding ``annotations.json``: ``data`` itself, or a built-in set's split
    (generated into the cache the first time)."""
    if data == "mnist-det":
        from ..paths import cache_dir

        base = cache_dir() / "datasets" / f"mnist-det-v{MNIST_DET_VERSION}"
        if not (base / "val" / ANNOTATIONS).is_file():
            make_mnist_det(base)
        return base / split
    path = Path(data)
    if not (path / ANNOTATIONS).is_file():
        raise MobileNetError(
            f"data not found: {data} (a folder with {ANNOTATIONS}, or one of: "
            f"{', '.join(BUILTIN_DETECTION)})"
        )
    return path


def make_mnist_det(
    root: str | Path,
    train_images: int = TRAIN_IMAGES,
    val_images: int = VAL_IMAGES,
    seed: int = 0,
) -> Path:
    """Write the digits-detection set to ``root/{train,val}`` (JPEG + annotations.json).

    Deterministic for a given ``seed``; written into a temporary folder and renamed, so
    an interrupted run leaves nothing half-made.
    """
    return write_digit_splits(
        Path(root),
        "the mnist-det dataset",
        (train_images, val_images),
        seed,
        lambda digits: digits[:, 0],
        _write_split,
    )


def _write_split(
    folder: Path,
    count: int,
    digits: np.ndarray,
    labels: np.ndarray,
    textures: list[np.ndarray],
    rng: np.random.Generator,
) -> None:
    folder.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas, boxes = _compose(digits, labels, textures, rng)
        name = f"{image_id:05d}.jpg"
        Image.fromarray(canvas).save(folder / name, quality=92)
        images.append(
            {"id": image_id, "file_name": name, "width": IMAGE_SIZE, "height": IMAGE_SIZE}
        )
        for (x1, y1, x2, y2), label in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": d, "name": str(d)} for d in range(10)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (folder / ANNOTATIONS).write_text(json.dumps(coco))


def _compose(
    digits: np.ndarray, labels: np.ndarray, textures: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[tuple[int, int, int, int], int]]]:
    """One image: a random texture crop (random tint), 1-6 digits that overlap little."""
    texture = textures[rng.integers(len(textures))]
    y0 = rng.integers(texture.shape[0] - IMAGE_SIZE + 1)
    x0 = rng.integers(texture.shape[1] - IMAGE_SIZE + 1)
    canvas = texture[y0 : y0 + IMAGE_SIZE, x0 : x0 + IMAGE_SIZE].astype(np.float32)
    canvas = np.clip(canvas * rng.uniform(0.6, 1.2, size=3), 0, 255)
    boxes: list[tuple[tuple[int, int, int, int], int]] = []
    for _ in range(int(rng.integers(1, 7))):
        for _attempt in range(20):
            size = int(np.exp(rng.uniform(*np.log(DIGIT_SIZES))))
            x, y = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, size=2))
            if all(_overlap((x, y, x + size, y + size), b) < 0.1 for b, _ in boxes):
                break
        else:
            continue
        index = int(rng.integers(len(digits)))
        cell = Image.fromarray(digits[index]).resize((size, size), Image.BILINEAR)
        alpha = np.asarray(cell, dtype=np.float32)[..., None] / 255
        region = canvas[y : y + size, x : x + size]
        # a colour far from the background under the digit
        colour = rng.uniform(0, 70, 3) if region.mean() > 110 else rng.uniform(185, 255, 3)
        canvas[y : y + size, x : x + size] = region * (1 - alpha) + colour * alpha
        ys, xs = np.nonzero(alpha[..., 0] > 0.3)
        box = (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)
        boxes.append((box, int(labels[index])))
    if not boxes:  # cannot happen for the first digit, which always fits
        raise AssertionError("no digit placed")
    return canvas.round().astype(np.uint8), boxes


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / smaller
