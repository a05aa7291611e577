"""Loading trained detectors and drawing their detections."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from ..data.images import load_rgb
from ..errors import MobileNetError
from ..fileio import atomic_write
from ..models.registry import list_models, model_from_checkpoint
from ..weights import read_checkpoint, saved_config
from .data import Category
from .model import SSDLite

__all__ = ["TrainedDetector", "detect_images", "load_detector"]


@dataclass
class TrainedDetector:
    model: SSDLite
    categories: list[Category]  # label i is categories[i - 1]

    def name_of(self, label: int) -> str:
        return self.categories[label - 1].name if 0 < label <= len(self.categories) else str(label)


def load_detector(weights: str | Path, model: str | None = None) -> TrainedDetector:
    """A detector from our ``best.safetensors`` (its config and categories are inside) or
    from a torchvision SSDLite state dict (``model`` defaults to
    ``ssdlite_mobilenet_v3_large``; labels are then COCO category ids)."""
    state_dict, metadata = read_checkpoint(weights)
    saved = saved_config(metadata)
    name = model or (saved["name"] if saved is not None else "ssdlite_mobilenet_v3_large")
    if name not in list_models(task="detection"):
        raise MobileNetError(
            f"{name} is not a detector: {', '.join(list_models(task='detection'))}"
        )
    detector = model_from_checkpoint(name, state_dict, metadata, str(weights))
    assert isinstance(detector, SSDLite)
    if "categories" in metadata:
        categories = [
            Category(int(c["id"]), str(c["name"])) for c in json.loads(metadata["categories"])
        ]
    else:  # label == category id (torchvision's COCO models)
        categories = [Category(i, str(i)) for i in range(1, detector.num_classes)]
    return TrainedDetector(detector.eval(), categories)


@torch.no_grad()
def detect_images(
    trained: TrainedDetector,
    paths: list[str],
    out: str | Path | None = None,
    min_score: float = 0.5,
) -> list[dict[str, Any]]:
    """Detections with score >= ``min_score`` in each image; with ``out``, each image is
    also written there as ``<name>.png`` with its boxes drawn."""
    results = []
    for path in paths:
        if not Path(path).is_file():
            raise MobileNetError(f"image not found: {path}")
        image = TF.pil_to_tensor(load_rgb(path))
        det = trained.model([TF.to_dtype(image, torch.float32, scale=True)])[0]
        keep = det["scores"] >= min_score
        boxes, scores, labels = det["boxes"][keep], det["scores"][keep], det["labels"][keep]
        names = [trained.name_of(int(label)) for label in labels]
        entry: dict[str, Any] = {
            "image": str(path),
            "detections": [
                {
                    "label": name,
                    "score": round(float(s), 4),
                    "box": [round(v, 1) for v in b.tolist()],
                }
                for name, s, b in zip(names, scores, boxes, strict=True)
            ],
        }
        if out is not None:
            drawn = draw_bounding_boxes(
                image,
                boxes,
                [f"{n} {float(s):.2f}" for n, s in zip(names, scores, strict=True)],
                colors="red",
                width=2,
            )
            target = Path(out) / f"{Path(path).stem}.png"
            picture = Image.fromarray(drawn.permute(1, 2, 0).numpy())
            atomic_write(target, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
            entry["drawn"] = str(target)
        results.append(entry)
    return results
