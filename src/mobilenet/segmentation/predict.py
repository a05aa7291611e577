"""Loading trained segmentation models, scoring them on a dataset, and writing their masks.

``predict`` writes two PNGs per image: ``<stem>_mask.png``, the class of every pixel as
a palette PNG (pixel value = class index, shown in PASCAL VOC's colours: the format of
VOC's ``SegmentationClass``), and ``<stem>_overlay.png``, the image with every pixel
that is not background tinted half-way to its class's colour. Both are at the image's
own size: the model sees the image resized to its input size, and its logits are
resized back.

Only the class of each pixel is needed, so a caller can hand :func:`segment_images` the
model's label maps made another way (``labels``): ``mobilenet predict`` passes the
memory-efficient executor's (``memory_efficient(model, output="labels")``), which resizes
and arg-maxes the logits one band of rows at a time instead of holding them whole at the
image's size (21 float32 maps: 84 bytes a pixel, where the label map takes one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..card import ModelCard
from ..data.images import header_problem, load_rgb, require_regular_file
from ..deployed import Trained, check_requested
from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..formats import format_of
from ..models.registry import list_models, model_from_checkpoint
from ..train.evaluate import finite_outputs
from ..weights import read_checkpoint, saved_config
from .builtin import dataset_root
from .data import VOC_CLASSES, SegmentationFolder, Size, eval_transform, palette
from .heads import resize
from .metrics import evaluate_segmenter, predict_classes
from .model import SegmentationModel, SegmenterConfig

__all__ = [
    "LabelMaps",
    "OnnxSegmenter",
    "evaluate_on",
    "load_segmenter",
    "output_names",
    "segment_images",
    "trained_segmenter",
]

TORCHVISION_SIZE = (520, 520)  # torchvision's segmentation weights evaluate at 520
OVERLAY_ALPHA = 0.5

# A batch of one image at the model's input size and a (height, width) -> the [1, h, w]
# class of every pixel of the logits resized to that size (what predict_classes gives).
LabelMaps = Callable[[torch.Tensor, Size], torch.Tensor]


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
) -> Trained:
    """A segmentation model from our ``best.safetensors`` (config, classes and input size
    are inside), from the ONNX file ``mobilenet export`` writes of one, or from a
    torchvision LR-ASPP / DeepLabv3 state dict (``model`` defaults to
    ``lraspp_mobilenet_v3_large``; 21 classes are VOC's, input 520x520). A ``model`` or
    ``width_mult`` that contradicts the file's own config is refused."""
    exported = format_of(Path(weights))
    if exported is not None:
        if "segmentation" not in exported.tasks:
            raise MobileNetError(
                f"{weights}: a {exported.name} file holds a classifier; segmentation models "
                "export to ONNX"
            )
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
    card = ModelCard.read(metadata, str(weights))
    classes = _saved_classes(card, weights, network.num_classes)
    size = card.input_size or TORCHVISION_SIZE
    return trained_segmenter(network.eval(), classes, size, Path(weights), card)


def trained_segmenter(
    model: SegmentationModel | OnnxSegmenter,
    classes: list[str],
    size: Size,
    path: Path | None = None,
    card: ModelCard | None = None,
) -> Trained:
    """A segmentation model, its classes (0 the background) and its input ``(height,
    width)`` as a loaded model, its card (its file's, else a new one) saying them."""
    card = (card or ModelCard()).replace(
        config=model.config.to_dict(), task="segmentation", classes=classes, input_size=size
    )
    return Trained(model, classes, size, path, card=card)


def _load_onnx(path: Path, model: str | None, width_mult: float | None) -> Trained:
    """A segmentation model's ONNX file, its metadata checked against its graph."""
    from ..export.onnx import onnx_session, read_metadata
    from ..formats.onnx import onnx_shapes

    session = onnx_session(path)
    metadata = read_metadata(session)
    if metadata.get("task") != "segmentation" or "config" not in metadata:
        raise MobileNetError(f"{path}: not a segmentation model's ONNX file of mobilenet export")
    card = ModelCard.read(metadata, str(path))
    saved = dict(card.config or {})
    try:
        config = SegmenterConfig(**saved)
    except TypeError as e:  # unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    check_requested(path, saved, model, width_mult)
    if config.name not in list_models(task="segmentation"):
        raise CheckpointError(
            f"{path}: metadata 'config' names {config.name!r}, not a segmentation model"
        )
    if card.input_size is None:
        raise CheckpointError(f"{path}: metadata 'resolution' is missing")
    size = card.input_size
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
    classes = _saved_classes(card, path, config.num_classes)
    return trained_segmenter(OnnxSegmenter(session, config, path), classes, size, path, card)


def _saved_classes(card: ModelCard, weights: str | Path, count: int) -> list[str]:
    if card.classes is None:
        return list(VOC_CLASSES) if count == len(VOC_CLASSES) else [str(i) for i in range(count)]
    if len(card.classes) != count:
        raise CheckpointError(
            f"{weights}: metadata 'classes' lists {len(card.classes)} classes; the model has "
            f"{count}"
        )
    return list(card.classes)


def evaluate_on(
    trained: Trained, data: str, batch_size: int = 16, workers: int = 0
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
    trained: Trained, paths: list[str], out: str | Path, labels: LabelMaps | None = None
) -> list[dict[str, Any]]:
    """Segment each image; write its mask and overlay into ``out`` (see the module
    docstring). Every input is checked before anything is written; each file is written
    whole or not at all. Each result gives the share of the image's pixels per class
    found. ``labels`` makes the class maps in place of the model's forward (the same
    maps: see the module docstring); NaN or infinite logits are refused either way."""
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
        normalised = TF.normalize(
            TF.to_dtype(image, torch.float32, scale=True), list(config.mean), list(config.std)
        )
        source = str(trained.path or "the model")
        if labels is not None:
            classes = _label_map(labels, normalised, trained.size, source)
        else:
            with finite_outputs([trained.model], source):
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
            {
                "image": str(path),
                "mask": str(mask_path),
                "overlay": str(overlay_path),
                "classes": shares,
            }
        )
    return results


def _label_map(labels: LabelMaps, image: torch.Tensor, size: Size, source: str) -> torch.Tensor:
    """The class of every pixel of the normalised ``image`` ``[3, h, w]`` from ``labels``,
    the image resized to the model's input ``size`` as :func:`predict_classes` resizes it."""
    try:
        return labels(resize(image[None], size), (image.shape[1], image.shape[2]))[0]
    except MobileNetError as e:  # NaN logits, say: the maker does not know the file
        raise MobileNetError(f"{source}: {e}") from None


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
    index = classes.numpy().astype(np.int64) % 256  # a uint8 map's % 256 would overflow
    tint = np.asarray(colours, dtype=np.float32)[index]
    shown = (classes.numpy() != 0)[..., None]
    blended = np.where(shown, (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * tint, pixels)
    return Image.fromarray(blended.round().astype(np.uint8))


def _write_png(path: Path, picture: Image.Image) -> None:
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
