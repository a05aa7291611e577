"""Detection data: COCO-format folders, their augmentation, and the built-in digits set.

A dataset is a folder holding ``annotations.json`` (COCO's ``images``, ``annotations``
with ``bbox = [x, y, w, h]`` in pixels, ``categories``) and the image files it names
(relative to the folder, or to ``images/`` inside it). Category ids may be anything;
the model's labels are ``1 .. K`` in order of id (0 is the background), and the mapping
is saved with the trained weights.

Bad annotations never reach the training loop: when the dataset is opened, a box
reaching outside its image is clipped to it, and a box with no area (before or after
clipping), an annotation with an unknown category or image id, an image whose file is
missing or does not decode, and an image or category whose id was already listed (the
first is kept) are skipped; one warning gives the count of each. A file that is not
COCO-shaped (a list that is not a list, an id that is not an integer, a missing
``file_name``) is refused in one line naming the file and the entry, and so is a
``file_name`` that leads out of the dataset's folder (an absolute path, ``..``).

The built-in ``mnist-det`` set and :func:`dataset_root`, which finds a dataset's folder,
are in :mod:`mobilenet.detection.builtin`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..card import Category
from ..data.images import check_headers, load_rgb
from ..errors import MobileNetError

__all__ = [
    "ANNOTATIONS",
    "AUGMENTS",
    "Category",
    "CocoDetection",
    "collate",
    "eval_transform",
    "train_transform",
]

ANNOTATIONS = "annotations.json"
Target = dict[str, Any]


class CocoDetection(Dataset):
    """A COCO-format detection folder: ``(image, {"boxes", "labels", "image_id"})``.

    ``boxes`` is a ``tv_tensors.BoundingBoxes`` (x1, y1, x2, y2, pixels), ``labels`` are
    ``1 .. len(categories)``; ``transform`` (torchvision.transforms.v2) is applied to the
    pair. ``categories`` may fix the label order (a validation set must use the
    training set's).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[..., Any] | None = None,
        categories: Sequence[Category] | None = None,
        check: bool = True,
    ) -> None:
        """``check=False`` skips decoding every image once when the folder is opened (about
        a millisecond an image): for data known to be sound, such as the generated
        ``mnist-det``; a corrupt image then fails only when it is read."""
        self.root = Path(root)
        path = self.root / ANNOTATIONS
        if not path.is_file():
            raise MobileNetError(f"{self.root}: no {ANNOTATIONS} (a COCO-format detection folder)")
        self.skipped: Counter[str] = Counter()
        found, images, annotations = self._read(path)
        self.categories = list(categories) if categories is not None else found
        if not self.categories:
            raise MobileNetError(f"{path}: no categories")
        self.label_of = {c.id: i + 1 for i, c in enumerate(self.categories)}
        self.transform = transform
        self.images, self.targets = self._clean(path, images, annotations, check)
        self._cache: torch.Tensor | None = None  # resized images, see cache_resized
        self._cached_boxes: list[torch.Tensor] = []  # their boxes, scaled to match
        if self.skipped:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            warnings.warn(f"{path}: {counts}", stacklevel=2)
        if not self.images:
            raise MobileNetError(f"{self.root}: no usable images")

    @property
    def classes(self) -> list[str]:
        return [c.name for c in self.categories]

    def _read(
        self, path: Path
    ) -> tuple[list[Category], list[dict[str, Any]], list[dict[str, Any]]]:
        """The file's categories (duplicates dropped), images and annotations, every entry
        checked for the fields and types used here, so nothing later fails on a bad one."""
        try:
            coco = json.loads(path.read_text())
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise MobileNetError(f"{path}: not a COCO annotation file ({e})") from None
        if not isinstance(coco, dict):
            raise MobileNetError(
                f"{path}: not a COCO annotation file (a JSON {_kind(coco)}, not an object)"
            )
        images = _entries(coco, "images", path)
        annotations = _entries(coco, "annotations", path, required=False)
        found: dict[int, Category] = {}
        for i, entry in enumerate(_entries(coco, "categories", path)):
            where = f"{path}: categories[{i}]"
            category = Category(_get(entry, "id", int, where), _get(entry, "name", str, where))
            if category.id in found:
                self.skipped["categories skipped (id listed twice, the first kept)"] += 1
                continue
            found[category.id] = category
        for i, info in enumerate(images):
            where = f"{path}: images[{i}]"
            _get(info, "id", int, where)
            name = _get(info, "file_name", str, where)
            if not _stays_inside(name):
                raise MobileNetError(f"{where}: file_name {name!r} leads out of {self.root}")
            if ("width" in info) != ("height" in info):
                raise MobileNetError(f"{where}: has one of width and height, not both")
            if "width" in info and min(_get(info, k, int, where) for k in ("width", "height")) < 1:
                raise MobileNetError(f"{where}: width and height must be positive")
        for i, ann in enumerate(annotations):
            where = f"{path}: annotations[{i}]"
            _get(ann, "image_id", int, where)
            _get(ann, "category_id", int, where)
            if ann.get("iscrowd", 0) not in (0, 1):
                raise MobileNetError(f"{where}: iscrowd must be 0 or 1, got {ann['iscrowd']!r}")
        return sorted(found.values()), images, annotations

    def _file(self, name: str) -> Path | None:
        """The image's file, relative to the folder or to ``images/`` in it; only a regular
        file counts (a folder or a FIFO is missing: opening a FIFO would block)."""
        for base in (self.root, self.root / "images"):
            if (base / name).is_file():
                return base / name
        return None

    def _clean(
        self,
        path: Path,
        images: list[dict[str, Any]],
        annotations: list[dict[str, Any]],
        check: bool,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        by_image: dict[int, list[dict[str, Any]]] = {}
        for ann in annotations:
            by_image.setdefault(ann["image_id"], []).append(ann)
        listed, files = set(), {}
        for info in images:
            if info["id"] in listed:
                self.skipped["images skipped (id listed twice, the first kept)"] += 1
                continue
            listed.add(info["id"])
            file = self._file(info["file_name"])
            if file is None:
                self.skipped["images skipped (file missing)"] += 1
                continue
            files[info["id"]] = file
        unknown = sum(len(anns) for image_id, anns in by_image.items() if image_id not in listed)
        if unknown:
            self.skipped["boxes skipped (unknown image id)"] += unknown
        # Headers only (about 0.03 ms a file, not a decode): a file whose pixels are cut
        # short is refused in one line, naming it, when it is loaded.
        paths = list(files.values())
        broken = {paths[i] for i in check_headers([str(p) for p in paths])} if check else set()
        kept_images, targets = [], []
        for info in images:
            file = files.pop(info["id"], None)  # pop: a repeated id finds nothing the 2nd time
            if file is None:
                continue
            size = (info["width"], info["height"]) if "width" in info else _size(file)
            if file in broken or size is None:
                self.skipped["images skipped (corrupt)"] += 1
                continue
            width, height = size
            boxes, labels, crowd = [], [], []
            for ann in by_image.get(info["id"], []):
                box = self._clean_box(ann, width, height)
                if box is None:
                    continue
                boxes.append(box)
                labels.append(self.label_of[ann["category_id"]])
                crowd.append(int(ann.get("iscrowd", 0)))
            kept_images.append({**info, "path": file, "width": width, "height": height})
            targets.append(
                {
                    "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(labels, dtype=torch.int64),
                    "iscrowd": torch.tensor(crowd, dtype=torch.int64),
                }
            )
        return kept_images, targets

    def _clean_box(self, ann: dict[str, Any], width: int, height: int) -> list[float] | None:
        if ann["category_id"] not in self.label_of:
            self.skipped["boxes skipped (unknown category id)"] += 1
            return None
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            self.skipped["boxes skipped (malformed bbox)"] += 1
            return None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            self.skipped["boxes skipped (malformed bbox)"] += 1
            return None
        if not (w > 0 and h > 0):
            self.skipped["boxes skipped (zero area)"] += 1
            return None
        box = [max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))]
        if box != [x, y, x + w, y + h]:
            if not (box[2] > box[0] and box[3] > box[1]):
                self.skipped["boxes skipped (outside the image)"] += 1
                return None
            self.skipped["boxes clipped to the image"] += 1
        return box

    def __len__(self) -> int:
        return len(self.images)

    def cache_resized(self, size: int, threads: int = 2) -> None:
        """Decode every image once, resize it to ``size x size`` (as
        :func:`train_transform` does) and keep it in memory: ``3 * size * size`` bytes per image.
        Items are then served at that size, boxes scaled to match, and ``transform``
        applies to them: the same items as a transform that starts with that resize,
        without decoding and resizing every image in every epoch. DataLoader workers
        forked afterwards share the cache (one block, read only).
        """
        need = len(self.images) * 3 * size * size
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > total // 2:
            raise MobileNetError(
                f"caching {len(self.images)} images at {size}x{size} needs "
                f"{need / 2**30:.1f} GiB, over half of this machine's memory"
            )
        cache = torch.empty(len(self.images), 3, size, size, dtype=torch.uint8)

        def fill(i: int) -> None:
            image = v2.functional.pil_to_tensor(load_rgb(self.images[i]["path"]))
            cache[i] = v2.functional.resize(image, [size, size], antialias=False)

        with ThreadPoolExecutor(max(threads, 1)) as pool:  # decoding releases the GIL
            list(pool.map(fill, range(len(self.images))))
        self._cache = cache
        self._cached_boxes = [
            target["boxes"] * torch.tensor([size / info["width"], size / info["height"]] * 2)
            for info, target in zip(self.images, self.targets, strict=True)
        ]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        info, target = self.images[i], self.targets[i]
        if self._cache is not None:
            image, boxes = tv_tensors.Image(self._cache[i]), self._cached_boxes[i]
        else:
            image = tv_tensors.Image(v2.functional.pil_to_tensor(load_rgb(info["path"])))
            boxes = target["boxes"]
        keep = target["iscrowd"] == 0  # crowd regions count in evaluation only
        out: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes[keep], format="XYXY", canvas_size=tuple(image.shape[-2:])
            ),
            "labels": target["labels"][keep],
            "image_id": int(info["id"]),
        }
        if self.transform is not None:
            image, out = self.transform(image, out)
        return image, out

    def coco_ground_truth(self) -> dict[str, Any]:
        """The cleaned annotations, as a COCO dict with the model's labels as category ids
        (what :func:`mobilenet.detection.evaluate.coco_map` scores against)."""
        images, annotations = [], []
        for info, target in zip(self.images, self.targets, strict=True):
            images.append({"id": int(info["id"]), "width": info["width"], "height": info["height"]})
            for box, label, crowd in zip(
                target["boxes"].tolist(),
                target["labels"].tolist(),
                target["iscrowd"].tolist(),
                strict=True,
            ):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": int(info["id"]),
                        "category_id": label,
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": crowd,
                    }
                )
        categories = [{"id": i + 1, "name": c.name} for i, c in enumerate(self.categories)]
        return {"images": images, "annotations": annotations, "categories": categories}


def _kind(value: Any) -> str:
    """A JSON value's type, in JSON's words, for messages."""
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def _entries(
    coco: dict[str, Any], key: str, path: Path, required: bool = True
) -> list[dict[str, Any]]:
    """``coco[key]``, which must be a list of objects (``annotations`` may be absent: a
    test set's file has none)."""
    if key not in coco:
        if required:
            raise MobileNetError(f"{path}: not a COCO annotation file (no {key!r} list)")
        return []
    value = coco[key]
    if not isinstance(value, list):
        raise MobileNetError(f"{path}: {key!r} must be a list, got a {_kind(value)}")
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise MobileNetError(f"{path}: {key}[{i}] must be an object, got a {_kind(entry)}")
    return value


def _get(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """``entry[key]``, which must be there and of ``kind`` (an int is never a bool, and a
    string id such as ``"7"`` is refused: ids are matched across the file as numbers)."""
    if key not in entry:
        raise MobileNetError(f"{where} has no {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        wanted = "an integer" if kind is int else "a string"
        raise MobileNetError(f"{where}: {key!r} must be {wanted}, got {value!r}")
    return value


def _stays_inside(name: str) -> bool:
    """Whether ``name``, read from a data file, names a path inside the dataset's folder:
    relative (no root, no drive) and without ``..``, in POSIX and Windows spelling."""
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.drive or windows.root:
        return False
    return ".." not in posix.parts and ".." not in windows.parts


def _size(file: Path) -> tuple[int, int] | None:
    """An image's (width, height) from its header; None when it cannot be read."""
    try:
        with Image.open(file) as im:
            return im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


AUGMENTS = ("ssd", "light", "none")


def train_transform(
    size: int, flip: bool = True, augment: str = "ssd", fill: int = 127
) -> v2.Transform:
    """Training augmentation, with torchvision's box-aware transforms, then ``size x size``.

    ``"ssd"``: SSD's (Liu et al., Section 2.2 "Data augmentation"): zoom out (up to 4x,
    grey fill, half the time), a random crop with a minimum IoU with the objects,
    photometric distortion. ``"light"``: photometric distortion only; ``"none"``: just
    the resize. Horizontal flips unless ``flip=False`` (for data where mirroring changes
    the class, such as digits). Flips and colours come after the resize: the same
    augmentation at a fraction of the cost when the input is smaller than the images, and
    with ``"light"`` or ``"none"`` nothing random happens before the resize, so the
    images may come resized from :meth:`CocoDetection.cache_resized`.
    """
    if augment not in AUGMENTS:
        raise MobileNetError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    steps: list[v2.Transform] = []
    if augment == "ssd":
        zoom_fill = {tv_tensors.Image: fill, "others": 0}
        steps += [
            v2.RandomZoomOut(fill=zoom_fill, side_range=(1.0, 4.0), p=0.5),
            v2.RandomIoUCrop(),
        ]
    # Bilinear without antialiasing: the resize the detector applies to its inputs
    # (torchvision's GeneralizedRCNNTransform), so training sees the pixels inference
    # sees; a no-op on cached images.
    steps.append(v2.Resize((size, size), antialias=False))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment != "none":
        steps.append(v2.RandomPhotometricDistort(p=0.5))
    steps += [v2.SanitizeBoundingBoxes(min_size=1), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def eval_transform() -> v2.Transform:
    """Images at their own size, as floats in [0, 1]: the model resizes them itself and
    maps its boxes back, so detections are scored in each image's pixels."""
    return v2.ToDtype(torch.float32, scale=True)


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    """Lists of images and targets (images may differ in size; targets in box counts)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
