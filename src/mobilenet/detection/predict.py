"""Loading trained detectors and drawing their detections."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from ..data.images import load_rgb
from ..deployed import check_requested
from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..inference import check_image_files
from ..models.registry import list_models, model_from_checkpoint
from ..train.evaluate import finite_outputs
from ..weights import read_checkpoint, saved_config
from .data import Category
from .evaluate import prediction_layers
from .model import SSDLite

__all__ = ["TrainedDetector", "detect_images", "drawing_names", "load_detector"]


@dataclass
class TrainedDetector:
    model: SSDLite
    categories: list[Category]  # label i is categories[i - 1]
    path: Path | None = None  # the weights file it came from

    def name_of(self, label: int) -> str:
        return self.categories[label - 1].name if 0 < label <= len(self.categories) else str(label)


def load_detector(
    weights: str | Path, model: str | None = None, width_mult: float | None = None
) -> TrainedDetector:
    """A detector from our ``best.safetensors`` (its config and categories are inside) or
    from a torchvision SSDLite state dict (``model`` defaults to
    ``ssdlite_mobilenet_v3_large``; labels are then COCO category ids). A ``model`` or
    ``width_mult`` that contradicts the file's own config is refused."""
    state_dict, metadata = read_checkpoint(weights)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{weights}: {e}") from None
    if saved is not None:
        check_requested(Path(weights), saved, model, width_mult)
    name = model or (saved["name"] if saved is not None else "ssdlite_mobilenet_v3_large")
    if name not in list_models(task="detection"):
        raise MobileNetError(
            f"{name} is not a detector: {', '.join(list_models(task='detection'))}"
        )
    kwargs = {} if width_mult is None or saved is not None else {"width_mult": width_mult}
    detector = model_from_checkpoint(name, state_dict, metadata, str(weights), **kwargs)
    assert isinstance(detector, SSDLite)
    if "categories" in metadata:
        categories = _saved_categories(metadata, weights, detector.num_classes)
    else:  # label == category id (torchvision's COCO models)
        categories = [Category(i, str(i)) for i in range(1, detector.num_classes)]
    return TrainedDetector(detector.eval(), categories, Path(weights))


def _saved_categories(
    metadata: Mapping[str, str], weights: str | Path, num_classes: int
) -> list[Category]:
    """The ``categories`` training saved: a JSON list of ``{"id": int, "name": str}``, one
    per label after the background. Anything else is a damaged file, said in one line
    rather than a traceback later, when a label is named."""
    where = f"{weights}: metadata 'categories'"
    try:
        saved = json.loads(metadata["categories"])
    except ValueError as e:
        raise CheckpointError(f"{where} is not JSON ({e})") from None
    if not isinstance(saved, list) or not all(
        isinstance(c, dict)
        and isinstance(c.get("id"), int)
        and not isinstance(c.get("id"), bool)
        and isinstance(c.get("name"), str)
        for c in saved
    ):
        raise CheckpointError(f'{where} is not a list of {{"id": integer, "name": string}}')
    if len(saved) != num_classes - 1:
        raise CheckpointError(
            f"{where} lists {len(saved)} categories; the detector has {num_classes - 1}"
        )
    return [Category(c["id"], c["name"]) for c in saved]


def drawing_names(paths: list[str]) -> list[str]:
    """A distinct ``<stem>.png`` for each input: inputs that share a stem (``a/1.png`` and
    ``b/1.png``, or ``1.jpg`` and ``1.png``) get ``1.png``, ``1-2.png``, ... in input order,
    skipping names already given, so no drawing overwrites another. Names are compared
    case-folded: on macOS and Windows ``A.png`` and ``a.png`` are the same file."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = f"{stem}.png", 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        names.append(name)
    return names


def _read_image(path: str) -> torch.Tensor:
    try:
        return TF.pil_to_tensor(load_rgb(path))
    except MobileNetError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MobileNetError(f"{path}: not a readable image ({e})") from None


@torch.no_grad()
def detect_images(
    trained: TrainedDetector,
    paths: list[str],
    out: str | Path | None = None,
    min_score: float = 0.5,
) -> list[dict[str, Any]]:
    """Detections with score >= ``min_score`` in each image; with ``out``, each image is
    also written there with its boxes drawn, as ``<name>.png`` made distinct (see
    :func:`drawing_names`); each result's ``drawn`` says which file is its drawing."""
    check_image_files(paths)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise MobileNetError(f"{out} is a file, not a folder for the drawn images")
    names = drawing_names(paths)
    results = []
    source = str(trained.path or "the model")
    for path, drawn_name in zip(paths, names, strict=True):
        image = _read_image(path)
        with finite_outputs(prediction_layers(trained.model), source):
            det = trained.model([TF.to_dtype(image, torch.float32, scale=True)])[0]
        keep = det["scores"] >= min_score
        boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        labelled = [trained.name_of(int(label)) for label in labels]
        entry: dict[str, Any] = {
            "image": str(path),
            "detections": [
                {
                    "label": label,
                    "score": round(float(s), 4),
                    "box": [round(v, 1) for v in b.tolist()],
                }
                for label, s, b in zip(labelled, scores, boxes, strict=True)
            ],
        }
        if out is not None:
            drawn = draw_bounding_boxes(
                image,
                boxes,
                [f"{n} {float(s):.2f}" for n, s in zip(labelled, scores, strict=True)],
                colors="red",
                width=2,
            )
            target = Path(out) / drawn_name
            picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
            atomic_write(target, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            entry["drawn"] = str(target)
        results.append(entry)
    return results
