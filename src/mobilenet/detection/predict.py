"""Loading trained detectors, scoring them (COCO mAP) and drawing their detections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

from ..card import Category, ModelCard
from ..data.images import check_image_files, load_rgb
from ..deployed import Trained, check_requested
from ..errors import CheckpointError, MobileNetError
from ..fileio import atomic_write
from ..models.registry import list_models, model_from_checkpoint
from ..train.evaluate import finite_outputs
from ..weights import read_checkpoint, saved_config
from .evaluate import evaluate_detector, prediction_layers
from .model import SSDLite

__all__ = ["detect_images", "drawing_names", "evaluate_on", "load_detector", "trained_detector"]


def trained_detector(
    model: SSDLite,
    categories: list[Category],
    path: Path | None = None,
    card: ModelCard | None = None,
) -> Trained:
    """A detector and its categories (label i is ``categories[i - 1]``) as a loaded model,
    its card (its file's, else a new one) saying them."""
    card = (card or ModelCard()).replace(
        config=model.config.to_dict(),
        task="detection",
        classes=tuple(c.name for c in categories),
        category_ids=tuple(c.id for c in categories),
        input_size=(model.config.image_size,) * 2,
    )
    return Trained(model, [c.name for c in categories], model.config.image_size, path, card=card)


def load_detector(
    weights: str | Path, model: str | None = None, width_mult: float | None = None
) -> Trained:
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
    card = ModelCard.read(metadata, str(weights))
    if card.classes is not None:
        categories = _saved_categories(card, weights, detector.num_classes)
    else:  # label == category id (torchvision's COCO models)
        categories = [Category(i, str(i)) for i in range(1, detector.num_classes)]
    return trained_detector(detector.eval(), categories, Path(weights), card)


def _saved_categories(card: ModelCard, weights: str | Path, num_classes: int) -> list[Category]:
    """The categories training saved in the card: one per label after the background,
    with their dataset ids. A count that does not fit the detector is a damaged file,
    said in one line rather than a traceback later, when a label is named."""
    names = card.classes or ()
    ids = card.category_ids or tuple(range(1, len(names) + 1))
    if len(ids) != len(names):
        raise CheckpointError(
            f"{weights}: metadata 'category_ids' lists {len(ids)} ids for {len(names)} classes"
        )
    if len(names) != num_classes - 1:
        raise CheckpointError(
            f"{weights}: metadata 'categories' lists {len(names)} categories; the detector "
            f"has {num_classes - 1}"
        )
    return [Category(i, name) for i, name in zip(ids, names, strict=True)]


def evaluate_on(
    trained: Trained, data: str, batch_size: int = 16, workers: int = 0, device: str = "cpu"
) -> dict[str, float]:
    """COCO mAP of ``trained`` on ``data``: mnist-det's held-out split, or a COCO-format
    folder (its images and annotations.json) whose categories are the detector's."""
    from ..train.distributed import resolve_device
    from .builtin import dataset_root
    from .data import CocoDetection, eval_transform

    split = "val" if data == "mnist-det" else "train"
    dataset = CocoDetection(dataset_root(data, split), eval_transform(), trained.categories)
    model = trained.model.to(resolve_device(device))
    source = str(trained.path or "the model")
    return evaluate_detector(model, dataset, batch_size, workers, source=source)


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
    trained: Trained,
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
