"""Segmentation data: image/mask folders in two layouts, and their joint augmentation.

A dataset folder is in one of the two layouts people have:

* **PASCAL VOC**: ``JPEGImages/<name>.jpg``, ``SegmentationClass/<name>.png`` (palette
  PNGs whose pixel values are class indices) and ``ImageSets/Segmentation/<split>.txt``
  listing the names of each split (``train``, ``val``). The classes are VOC's 21
  (:data:`VOC_CLASSES`, 0 = background).
* **Pairs**: ``images/<stem>.<ext>`` and ``masks/<stem>.png`` (index PNGs: palette or
  8/16-bit greyscale, the value of a pixel is its class); the whole folder is one split.

In both, 255 marks pixels to ignore (VOC's object borders), and a ``classes.txt`` in
the folder (one name a line, line ``i`` naming class ``i``) sets the classes. Without
one, a pairs folder has as many classes as its largest mask value + 1.

Bad pairs never reach the training loop: when the folder is opened each image and mask
is decoded once (in threads), and a pair is skipped when its mask is missing, either
file is missing or unreadable, their sizes differ, or the mask holds a value that is
neither a class nor 255; one warning gives the count of each reason. A name in a split
list that leads out of the folder (absolute, ``..``) is refused in one line.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..data.images import IMAGE_EXTENSIONS, load_rgb
from ..errors import MobileNetError

__all__ = [
    "IGNORE",
    "VOC_CLASSES",
    "SegmentationFolder",
    "collate",
    "eval_transform",
    "palette",
    "train_transform",
]

IGNORE = 255  # the mask value of pixels that count neither in the loss nor in the scores
CLASSES_FILE = "classes.txt"
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
MASK_MODES = ("P", "L", "I;16", "I")  # single-band modes whose values are indices
Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


class SegmentationFolder(Dataset):
    """``(image, mask)`` pairs of a folder in either layout (see the module docstring).

    ``transform`` (torchvision.transforms.v2) is applied to ``(tv_tensors.Image,
    tv_tensors.Mask)`` jointly; the mask holds int64 class indices and 255. ``classes``
    fixes the classes (a held-out set must use the training set's). ``check=False`` skips
    decoding every pair when the folder is opened: for data known to be sound, such as the
    generated ``mnist-seg``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        classes: list[str] | None = None,
        check: bool = True,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.rejected: Counter[str] = Counter()
        pairs, self.layout = self._pairs(split)
        given = classes if classes is not None else _read_classes(self.root, self.layout)
        found_max = 0
        if check:
            pairs, found_max = self._checked(pairs, len(given) if given else None)
        if self.rejected:
            counts = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items()))
            total = sum(self.rejected.values())
            warnings.warn(
                f"{self.root}: {total} image/mask pair(s) skipped ({counts})", stacklevel=2
            )
        if not pairs:
            raise MobileNetError(f"{self.root}: no usable image/mask pairs")
        self.pairs = pairs
        if not given and not check:
            raise MobileNetError(f"{self.root}: no {CLASSES_FILE}, and the masks are unread")
        self.classes = list(given) if given else [str(i) for i in range(max(found_max, 1) + 1)]
        if len(self.classes) < 2:
            raise MobileNetError(f"{self.root}: {len(self.classes)} class: need at least 2")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _pairs(self, split: str) -> tuple[list[Pair], str]:
        root = self.root
        if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
            listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
            pairs = []
            for name in _read_split(listing, root):
                image = _find_image(root / "JPEGImages", name)
                if image is None:
                    self.rejected["image missing"] += 1
                    continue
                pairs.append(Pair(image, root / "SegmentationClass" / f"{name}.png"))
            return pairs, "voc"
        if (root / "images").is_dir() and (root / "masks").is_dir():
            images = sorted(
                p for p in (root / "images").iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )  # fmt: skip
            return [Pair(p, root / "masks" / f"{p.stem}.png") for p in images], "pairs"
        if not root.is_dir():
            raise MobileNetError(f"segmentation data not found: {root}")
        raise MobileNetError(
            f"{root}: not a segmentation folder (JPEGImages/ + SegmentationClass/ as in "
            "PASCAL VOC, or images/ + masks/)"
        )

    def _checked(self, pairs: list[Pair], num_classes: int | None) -> tuple[list[Pair], int]:
        """The pairs that decode, agree in size and hold only known values; the largest
        class value found."""
        with ThreadPoolExecutor(2) as pool:  # decoding releases the GIL
            problems = list(pool.map(lambda p: _pair_problem(p, num_classes), pairs))
        kept, largest = [], 0
        for pair, (problem, top) in zip(pairs, problems, strict=True):
            if problem is not None:
                self.rejected[problem] += 1
            else:
                kept.append(pair)
                largest = max(largest, top)
        return kept, largest

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.pairs[i]
        image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(pair.image)))
        mask = tv_tensors.Mask(torch.from_numpy(read_mask(pair.mask)))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def read_mask(path: Path) -> np.ndarray:
    """A mask PNG as int64 ``[H, W]`` class indices; one line naming it if unreadable."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise MobileNetError(
                    f"{path}: not an index mask (mode {im.mode}; masks are palette or "
                    "greyscale PNGs whose values are classes)"
                )
            return np.asarray(im, dtype=np.int64)
    except MobileNetError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise MobileNetError(f"{path}: not a readable mask ({e})") from None


def _pair_problem(pair: Pair, num_classes: int | None) -> tuple[str | None, int]:
    """Why a pair cannot be used (None: it can), and its mask's largest class value."""
    if not pair.mask.is_file():
        return "mask missing", 0
    try:
        with Image.open(pair.image) as im:
            im.load()
            size = im.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return "image unreadable", 0
    try:
        mask = read_mask(pair.mask)
    except MobileNetError:
        return "mask unreadable", 0
    if (mask.shape[1], mask.shape[0]) != size:
        return "image and mask sizes differ", 0
    values = np.unique(mask)
    classes = values[values != IGNORE]
    top = int(classes.max()) if len(classes) else 0
    if (len(classes) and classes.min() < 0) or (num_classes is not None and top >= num_classes):
        return "mask values beyond the classes", 0
    return None, top


def _read_split(listing: Path, root: Path) -> list[str]:
    """The names a VOC split list holds, each refused if it leads out of ``root``."""
    try:
        text = listing.read_text()
    except OSError as e:
        raise MobileNetError(f"{listing}: cannot read the split list ({e.strerror or e})") from None
    except ValueError as e:  # not UTF-8
        raise MobileNetError(f"{listing}: not a split list ({e})") from None
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if not _stays_inside(name):
            raise MobileNetError(f"{listing}, line {number}: {name!r} leads out of {root}")
        names.append(name)
    return names


def _stays_inside(name: str) -> bool:
    """Whether a name read from a data file stays inside the dataset's folder: relative
    (no root, no drive) and without ``..``, in POSIX and Windows spelling."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        return False
    return ".." not in posix.parts and ".." not in windows.parts


def _find_image(folder: Path, name: str) -> Path | None:
    for suffix in (".jpg", ".jpeg", ".png"):
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    return None


def _read_classes(root: Path, layout: str) -> list[str] | None:
    """``classes.txt`` (one name a line), else VOC's classes for the VOC layout."""
    path = root / CLASSES_FILE
    if not path.exists():
        return list(VOC_CLASSES) if layout == "voc" else None
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise MobileNetError(f"{path}: cannot read the class names ({e})") from None
    if not 2 <= len(names) <= IGNORE:
        raise MobileNetError(f"{path}: {len(names)} classes: need 2 to {IGNORE}")
    return names


# --------------------------------------------------------------------------- transforms


def train_transform(
    size: Size,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    scale: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
) -> v2.Transform:
    """torchvision's segmentation reference recipe, jointly on image and mask: the shorter
    side resized to ``s`` times the crop's shorter side, ``s`` uniform in ``scale`` (the
    reference: 0.5 to 2.0 of its 520 base), a random ``size`` crop (padded where the image
    is smaller: 0 for the image, 255 "ignore" for the mask), horizontal flips unless
    ``flip=False`` (digits are not mirror-symmetric), then the model's normalisation.
    Masks are resized by nearest neighbour (``tv_tensors.Mask``)."""
    base = min(size)
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}
    steps: list[v2.Transform] = [
        v2.RandomResize(round(scale[0] * base), round(scale[1] * base) + 1, antialias=True),
        v2.RandomCrop(size, pad_if_needed=True, fill=fill),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Transform:
    """Image and mask at their own size, the image normalised: the evaluation resizes the
    image to the model's input and its logits back, so scores count the mask's pixels."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Training batches: images ``[N, 3, H, W]`` and masks ``[N, H, W]`` (int64)."""
    images, masks = zip(*batch, strict=True)
    return (
        torch.stack([i.as_subclass(torch.Tensor) for i in images]),
        torch.stack([m.as_subclass(torch.Tensor).reshape(m.shape[-2:]) for m in masks]).long(),
    )


def eval_collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Held-out batches: lists (images may differ in size)."""
    images, masks = zip(*batch, strict=True)
    return (
        [i.as_subclass(torch.Tensor) for i in images],
        [m.as_subclass(torch.Tensor).reshape(m.shape[-2:]).long() for m in masks],
    )


def palette(num_classes: int = 256) -> list[tuple[int, int, int]]:
    """PASCAL VOC's colour map: class ``c``'s colour spreads the bits of ``c`` over the
    high bits of R, G and B (0 black, 1 dark red, 2 dark green, ...; 255 white-ish)."""
    colours = []
    for c in range(num_classes):
        r = g = b = 0
        value = c
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours
