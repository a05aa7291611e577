"""Segmentation data: image/mask folders in two layouts, and their joint augmentation.

A dataset folder is in one of the two layouts people have:

* **PASCAL VOC**: ``JPEGImages/<name>.jpg``, ``SegmentationClass/<name>.png`` (palette
  PNGs whose pixel values are class indices) and ``ImageSets/Segmentation/<split>.txt``
  listing the names of each split (``train``, ``val``). The classes are VOC's 21
  (:data:`VOC_CLASSES`, 0 = background).
* **Pairs**: ``images/<stem>.<ext>`` and ``masks/<stem>.png`` (index PNGs: palette or
  8/16-bit greyscale, the value of a pixel is its class); the whole folder is one split.

In both, 255 marks pixels to ignore (VOC's object borders), and a ``classes.txt`` in
the folder (one name a line, line ``i`` naming class ``i``) sets the classes, or
``num_classes`` (``--num-classes``) their number. Without either, a pairs folder of 8-bit
masks has as many classes as its largest mask value + 1; 16-bit masks are refused then,
since their values are as often ids or scaled labels (0, 1000, 2000) as classes, and the
largest + 1 would make a 2,001-class model in which 255 is both a class and "ignore". So
there are at most 255 classes (0 to 254) in every case.

Bad pairs never reach the training loop: when the folder is opened each image and mask
is decoded once (in threads), and a pair is skipped when its mask is missing, either
file is missing or unreadable, or their sizes differ; one warning gives the count of each
reason. A mask holding a value that is neither a class nor 255 is refused, naming it: its
labels, or the declared classes, cannot be right. Masks with no labelled pixel (all 255)
are kept, but counted in one warning line naming one of them: they add nothing to the
loss, and a folder of nothing else, which would train at loss 0, is refused. A name in a split list
that leads out of the folder (absolute, ``..``) is refused in one line.
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
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
MASK_MODES = ("P", "L", "I;16", "I")  # single-band modes whose values are indices
DEEP_MODES = ("I;16", "I")  # 16-bit PNGs (PIL reads some as "I"): values up to 65,535
Size = tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path


class SegmentationFolder(Dataset):
    """``(image, mask)`` pairs of a folder in either layout (see the module docstring).

    ``transform`` (torchvision.transforms.v2) is applied to ``(tv_tensors.Image,
    tv_tensors.Mask)`` jointly; the mask holds int64 class indices and 255. ``classes``
    fixes the classes (a held-out set must use the training set's); ``num_classes``
    declares only their number (``--num-classes``; needed for 16-bit masks without a
    ``classes.txt``). ``check=False`` skips decoding every pair when the folder is opened:
    for data known to be sound, such as the generated ``mnist-seg``.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Callable[..., Any] | None = None,
        classes: list[str] | None = None,
        check: bool = True,
        num_classes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.rejected: Counter[str] = Counter()
        self.unlabelled: list[Path] = []  # masks kept with no pixel other than IGNORE
        pairs, self.layout = self._pairs(split)
        given = classes if classes is not None else _read_classes(self.root, self.layout)
        given = _declared(self.root, given, num_classes)
        found_max = 0
        if check:
            pairs, found_max = self._checked(pairs, len(given) if given else None)
        if self.rejected:
            counts = ", ".join(f"{n} {why}" for why, n in sorted(self.rejected.items()))
            total = sum(self.rejected.values())
            warnings.warn(
                f"{self.root}: {total} image/mask pair(s) skipped ({counts})",
                stacklevel=2,
            )
        if not pairs:
            raise MobileNetError(f"{self.root}: no usable image/mask pairs")
        self.pairs = pairs
        self._check_labelled()
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
                p
                for p in (root / "images").iterdir()
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            return [Pair(p, root / "masks" / f"{p.stem}.png") for p in images], "pairs"
        if not root.is_dir():
            raise MobileNetError(f"segmentation data not found: {root}")
        raise MobileNetError(
            f"{root}: not a segmentation folder (JPEGImages/ + SegmentationClass/ as in "
            "PASCAL VOC, or images/ + masks/)"
        )

    def _checked(self, pairs: list[Pair], num_classes: int | None) -> tuple[list[Pair], int]:
        """The pairs that decode, agree in size and hold only known values; the largest
        class value found. Skips are counted in :attr:`rejected`, masks without a labelled
        pixel listed in :attr:`unlabelled`."""
        with ThreadPoolExecutor(2) as pool:  # decoding releases the GIL
            verdicts = list(pool.map(lambda p: _verdict(p, num_classes), pairs))
        deep = [p for p, v in zip(pairs, verdicts, strict=True) if v.deep]
        if num_classes is None and deep:
            raise MobileNetError(
                f"{deep[0].mask}: a 16-bit mask ({len(deep)} in {self.root}), and no class "
                f"count declared: give --num-classes N or a {CLASSES_FILE} (one name a line); "
                "the classes are not guessed from the largest value of 16-bit masks"
            )
        beyond = [(p, v) for p, v in zip(pairs, verdicts, strict=True) if v.beyond is not None]
        if beyond:  # labels that cannot be right: the folder or its classes are wrong
            (pair, verdict), known = beyond[0], num_classes or IGNORE
            raise MobileNetError(
                f"{pair.mask}: holds the value {verdict.beyond}, which is neither one of the "
                f"{known} classes (0 to {known - 1}) nor {IGNORE} (ignored); {len(beyond)} "
                f"mask(s) in {self.root} do"
            )
        kept, largest, unlabelled = [], 0, []
        for pair, verdict in zip(pairs, verdicts, strict=True):
            if verdict.problem is not None:
                self.rejected[verdict.problem] += 1
                continue
            kept.append(pair)
            largest = max(largest, verdict.top)
            if not verdict.labelled:
                unlabelled.append(pair.mask)
        self.unlabelled = unlabelled
        return kept, largest

    def _check_labelled(self) -> None:
        """One warning line for masks without a labelled pixel; a refusal if all are."""
        if not self.unlabelled:
            return
        n, example = len(self.unlabelled), _shown(self.unlabelled[0], self.root)
        if n == len(self.pairs):
            raise MobileNetError(
                f"{self.root}: no mask has a labelled pixel (all are {IGNORE}, ignored), "
                f"e.g. {example}: nothing to learn or score"
            )
        warnings.warn(
            f"{self.root}: {n} of {len(self.pairs)} mask(s) have no labelled pixel (all "
            f"{IGNORE}, ignored) and add nothing, e.g. {example}",
            stacklevel=3,
        )

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
    return _read_mask(path)[0]


def _read_mask(path: Path) -> tuple[np.ndarray, str]:
    """A mask and its PIL mode."""
    try:
        with Image.open(path) as im:
            if im.mode not in MASK_MODES:
                raise MobileNetError(
                    f"{path}: not an index mask (mode {im.mode}; masks are palette or "
                    "greyscale PNGs whose values are classes)"
                )
            return np.asarray(im, dtype=np.int64), im.mode
    except MobileNetError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise MobileNetError(f"{path}: not a readable mask ({e})") from None


@dataclass(frozen=True)
class _Verdict:
    problem: str | None = None  # why the pair cannot be used; None: it can
    top: int = 0  # the mask's largest class value
    deep: bool = False  # a 16-bit mask: its values are not classes unless declared
    labelled: bool = True  # some pixel is not IGNORE
    beyond: int | None = None  # a value that is neither a class nor IGNORE


def _verdict(pair: Pair, num_classes: int | None) -> _Verdict:
    """Whether a pair can be used, and what its mask holds."""
    if not pair.mask.is_file():
        return _Verdict("mask missing")
    try:
        with Image.open(pair.image) as im:
            im.load()
            size = im.size
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return _Verdict("image unreadable")
    try:
        mask, mode = _read_mask(pair.mask)
    except MobileNetError:
        return _Verdict("mask unreadable")
    if (mask.shape[1], mask.shape[0]) != size:
        return _Verdict("image and mask sizes differ")
    values = np.unique(mask)
    classes = values[values != IGNORE]
    deep = mode in DEEP_MODES
    # Without declared classes, 8-bit values are classes (255 excepted): at most 0 to 254.
    limit = num_classes if num_classes is not None else IGNORE
    outside = classes[(classes < 0) | (classes >= limit)]
    if len(outside) and not (deep and num_classes is None):  # undeclared 16-bit: refused
        return _Verdict("mask values beyond the classes", beyond=int(outside[-1]))
    top = int(classes.max()) if len(classes) else 0
    return _Verdict(top=top, deep=deep, labelled=bool(len(classes)))


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the dataset's folder, for messages that also name the folder."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _declared(root: Path, given: list[str] | None, num_classes: int | None) -> list[str] | None:
    """The classes: the names given or read, else ``num_classes`` numbered ones, else
    None (left to the masks); refused when the two disagree or are out of range."""
    if num_classes is None:
        return given
    if not 2 <= num_classes <= IGNORE:
        raise MobileNetError(
            f"--num-classes {num_classes}: a segmentation model has 2 to {IGNORE} classes "
            f"({IGNORE} marks ignored pixels)"
        )
    if given is not None and len(given) != num_classes:
        raise MobileNetError(
            f"{root}: --num-classes {num_classes}, but the classes are {len(given)} "
            f"({', '.join(given[:5])}{', ...' if len(given) > 5 else ''})"
        )
    return given if given is not None else [str(i) for i in range(num_classes)]


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
