"""Loading trained segmentation models, scoring them on a dataset, and writing their masks.

``predict`` writes two PNGs per image: ``<stem>_mask.png``, the class of every pixel as
a palette PNG (pixel value = class index, shown in PASCAL VOC's colours: the format of
VOC's ``SegmentationClass``), and ``<stem>_overlay.png``, the image with every pixel
that is not background tinted half-way to its class's colour. Both are at the image's
own size: the model sees the image resized to its input size, and its logits are
resized back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from ..data.images import header_problem, load_rgb, require_regular_file
from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..models.registry import list_models, model_from_checkpoint
from ..weights import read_checkpoint, saved_config
from .builtin import dataset_root
from .data import VOC_CLASSES, SegmentationFolder, Size, eval_transform, palette
from .metrics import evaluate_segmenter, predict_classes
from .model import SegmentationModel

__all__ = [
    "TrainedSegmenter",
    "evaluate_on",
    "load_segmenter",
    "output_names",
    "segment_images",
]

TORCHVISION_SIZE = (520, 520)  # torchvision's segmentation weights evaluate at 520
OVERLAY_ALPHA = 0.5


@dataclass
class TrainedSegmenter:
    model: SegmentationModel
    classes: list[str]  # class i is classes[i]; 0 is the background
    size: Size  # the input (height, width) the model was trained for


def load_segmenter(weights: str | Path, model: str | None = None) -> TrainedSegmenter:
    """A segmentation model from our ``best.safetensors`` (config, classes and input size
    are inside) or from a torchvision LR-ASPP / DeepLabv3 state dict (``model`` defaults
    to ``lraspp_mobilenet_v3_large``; 21 classes are VOC's, input 520x520)."""
    state_dict, metadata = read_checkpoint(weights)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{weights}: {e}") from None
    name = model or (saved["name"] if saved is not None else "lraspp_mobilenet_v3_large")
    known = list_models(task="segmentation")
    if name not in known:
        raise MobileNetError(f"{name} is not a segmentation model: {', '.join(known)}")
    network = model_from_checkpoint(name, state_dict, metadata, str(weights))
    assert isinstance(network, SegmentationModel)
    classes = _saved_classes(metadata, weights, network.num_classes)
    size = _saved_size(metadata, weights)
    return TrainedSegmenter(network.eval(), classes, size)


def _saved_classes(metadata: Mapping[str, str], weights: str | Path, count: int) -> list[str]:
    if "classes" not in metadata:
        return list(VOC_CLASSES) if count == len(VOC_CLASSES) else [str(i) for i in range(count)]
    where = f"{weights}: metadata 'classes'"
    try:
        classes = json.loads(metadata["classes"])
    except ValueError as e:
        raise CheckpointError(f"{where} is not JSON ({e})") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where} is not a list of names")
    if len(classes) != count:
        raise CheckpointError(f"{where} lists {len(classes)} classes; the model has {count}")
    return classes


def _saved_size(metadata: Mapping[str, str], weights: str | Path) -> Size:
    text = metadata.get("image_size")
    if text is None:
        return TORCHVISION_SIZE
    try:
        height, width = (int(v) for v in text.split("x"))
    except ValueError:
        raise CheckpointError(f"{weights}: metadata 'image_size' {text!r} is not HxW") from None
    if not (0 < height <= 8192 and 0 < width <= 8192):
        raise CheckpointError(f"{weights}: metadata 'image_size' {text!r} is out of range")
    return height, width


def evaluate_on(
    trained: TrainedSegmenter, data: str, batch_size: int = 16, workers: int = 0
) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy on ``data``'s held-out images: a built-in
    set's held-out split, a VOC folder's ``val`` split, or a whole images/masks folder."""
    config = trained.model.config
    root, split = dataset_root(data, "val")
    dataset = SegmentationFolder(
        root, split, eval_transform(config.mean, config.std), trained.classes
    )
    confusion = evaluate_segmenter(
        trained.model, dataset, trained.size, len(trained.classes), batch_size, workers=workers
    )
    return {**confusion.scores(trained.classes), "images": len(dataset)}


def output_names(paths: list[str]) -> list[str]:
    """A distinct stem for each input: inputs that share one (``a/1.png`` and ``b/1.jpg``)
    get ``1``, ``1-2``, ... in input order; compared case-folded (macOS, Windows)."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = stem, 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.casefold())
        names.append(name)
    return names


@torch.no_grad()
def segment_images(
    trained: TrainedSegmenter, paths: list[str], out: str | Path
) -> list[dict[str, Any]]:
    """Segment each image; write its mask and overlay into ``out`` (see the module
    docstring). Every input is checked before anything is written; each file is written
    whole or not at all. Each result gives the share of the image's pixels per class
    found."""
    for path in paths:
        require_regular_file(path)
        problem = header_problem(str(path))
        if problem is not None:
            raise MobileNetError(f"{path}: not a readable image ({problem})")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MobileNetError(f"{out} is a file, not a folder for the masks")
    config = trained.model.config
    colours = palette(256)
    results = []
    for path, stem in zip(paths, output_names(paths), strict=True):
        image = TF.pil_to_tensor(load_rgb(path))
        normalised = TF.normalize(TF.to_dtype(image, torch.float32, scale=True),
                                  list(config.mean), list(config.std))  # fmt: skip
        classes = predict_classes(trained.model, [normalised], trained.size)[0]
        mask_path, overlay_path = out / f"{stem}_mask.png", out / f"{stem}_overlay.png"
        _write_png(mask_path, _mask_image(classes, colours))
        _write_png(overlay_path, _overlay(image, classes, colours))
        counts = torch.bincount(classes.flatten(), minlength=len(trained.classes))
        shares = {
            trained.classes[c]: round(n / classes.numel(), 4)
            for c, n in enumerate(counts.tolist())
            if n
        }
        results.append(
            {"image": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
             "classes": shares}
        )  # fmt: skip
    return results


def _mask_image(classes: torch.Tensor, colours: list[tuple[int, int, int]]) -> Image.Image:
    """A palette PNG of class indices (16-bit greyscale beyond 256 classes)."""
    values = classes.numpy()
    if values.max(initial=0) > 255:
        return Image.fromarray(values.astype(np.uint16))
    picture = Image.fromarray(values.astype(np.uint8))
    picture.putpalette([v for rgb in colours for v in rgb])
    return picture


def _overlay(
    image: torch.Tensor, classes: torch.Tensor, colours: list[tuple[int, int, int]]
) -> Image.Image:
    pixels = image.permute(1, 2, 0).numpy().astype(np.float32)
    tint = np.asarray(colours, dtype=np.float32)[classes.numpy() % 256]
    shown = (classes.numpy() != 0)[..., None]
    blended = np.where(shown, (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * tint, pixels)
    return Image.fromarray(blended.round().astype(np.uint8))


def _write_png(path: Path, picture: Image.Image) -> None:
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
