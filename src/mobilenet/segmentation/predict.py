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
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..data.images import header_problem, load_rgb, require_regular_file
from ..deployed import check_requested
from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..models.registry import list_models, model_from_checkpoint
from ..train.evaluate import finite_outputs
from ..weights import read_checkpoint, saved_config
from .builtin import dataset_root
from .data import VOC_CLASSES, SegmentationFolder, Size, eval_transform, palette
from .metrics import evaluate_segmenter, predict_classes
from .model import SegmentationModel, SegmenterConfig

__all__ = [
    "OnnxSegmenter",
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
    model: SegmentationModel | OnnxSegmenter
    classes: list[str]  # class i is classes[i]; 0 is the background
    size: Size  # the input (height, width) the model was trained for
    path: Path | None = None  # the weights file it came from


class OnnxSegmenter(nn.Module):
    """A segmentation model's ONNX file (``mobilenet export``: the ``"out"`` logits at the
    exported size) behind the model's call interface: a batch in, ``{"out": logits}``
    out, on the device of the batch."""

    task = "segmentation"

    def __init__(self, session: Any, config: SegmenterConfig, path: Path) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self.path = path
        # Evaluation finds the device of a model by its first parameter: this one's.
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        images = x.detach().cpu().float().contiguous().numpy()
        logits = torch.from_numpy(self.session.run(None, {"images": images})[0])
        expected = (len(x), self.num_classes, *x.shape[-2:])
        if tuple(logits.shape) != expected:
            raise CheckpointError(
                f"{self.path}: the graph outputs {tuple(logits.shape)} logits for "
                f"{tuple(x.shape)} images, not the {expected} of its metadata"
            )
        return {"out": logits.to(x.device)}


def load_segmenter(
    weights: str | Path, model: str | None = None, width_mult: float | None = None
) -> TrainedSegmenter:
    """A segmentation model from our ``best.safetensors`` (config, classes and input size
    are inside), from the ONNX file ``mobilenet export`` writes of one, or from a
    torchvision LR-ASPP / DeepLabv3 state dict (``model`` defaults to
    ``lraspp_mobilenet_v3_large``; 21 classes are VOC's, input 520x520). A ``model`` or
    ``width_mult`` that contradicts the file's own config is refused."""
    if Path(weights).suffix == ".onnx":
        return _load_onnx(Path(weights), model, width_mult)
    state_dict, metadata = read_checkpoint(weights)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{weights}: {e}") from None
    if saved is not None:
        check_requested(Path(weights), saved, model, width_mult)
    name = model or (saved["name"] if saved is not None else "lraspp_mobilenet_v3_large")
    known = list_models(task="segmentation")
    if name not in known:
        raise MobileNetError(f"{name} is not a segmentation model: {', '.join(known)}")
    kwargs = {} if width_mult is None or saved is not None else {"width_mult": width_mult}
    network = model_from_checkpoint(name, state_dict, metadata, str(weights), **kwargs)
    assert isinstance(network, SegmentationModel)
    classes = _saved_classes(metadata, weights, network.num_classes)
    size = _saved_size(metadata, weights)
    return TrainedSegmenter(network.eval(), classes, size, Path(weights))


def _load_onnx(path: Path, model: str | None, width_mult: float | None) -> TrainedSegmenter:
    """A segmentation model's ONNX file, its metadata checked against its graph."""
    from ..deployed import onnx_shapes
    from ..export.onnx import onnx_session, read_metadata

    session = onnx_session(path)
    metadata = read_metadata(session)
    if metadata.get("task") != "segmentation" or "config" not in metadata:
        raise MobileNetError(f"{path}: not a segmentation model's ONNX file of mobilenet export")
    try:
        saved = json.loads(metadata["config"])
        config = SegmenterConfig(**saved)
    except (ValueError, TypeError) as e:  # not JSON, not an object, unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    check_requested(path, saved, model, width_mult)
    if config.name not in list_models(task="segmentation"):
        raise CheckpointError(f"{path}: metadata 'config' names {config.name!r}, not a "
                              "segmentation model")  # fmt: skip
    size = _saved_size({"image_size": _size_text(metadata.get("resolution", ""))}, path)
    shape_in, shape_out = onnx_shapes(session)
    if shape_in[1:] != [3, *size]:
        raise CheckpointError(
            f"{path}: metadata says {size[0]}x{size[1]} images; the graph takes {shape_in}"
        )
    # The graph's upsampling leaves its output's shape undeclared: the first run checks it.
    if len(shape_out) != 4 or shape_out[1] not in (None, config.num_classes):
        raise CheckpointError(
            f"{path}: metadata 'config' says {config.num_classes} classes; the graph outputs "
            f"{shape_out}"
        )
    classes = _saved_classes(metadata, path, config.num_classes)
    return TrainedSegmenter(OnnxSegmenter(session, config, path), classes, size, path)


def _size_text(text: str) -> str:
    """A size as ONNX metadata writes it (``64``, ``64x96``) as ``HxW``."""
    return f"{text}x{text}" if text.isdigit() else text


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
    with finite_outputs([trained.model], str(trained.path or "the model")):
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
        with finite_outputs([trained.model], str(trained.path or "the model")):
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
