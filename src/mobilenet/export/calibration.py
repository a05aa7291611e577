"""Calibration of int8 models: the images (the user's data, preprocessed as ``eval``
does) and the PT2E observers, shared by every int8 format."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import MobileNetError

__all__ = [
    "calibrated_export",
    "calibration_batches",
    "calibration_count",
    "calibration_dataset",
    "observe",
]


def calibration_dataset(trained, data: str) -> Dataset:
    """The images to calibrate or fine-tune on, preprocessed as ``eval`` does (ranges
    observed on other inputs would not fit): a built-in dataset's training split (never
    the held-out one), or a folder read with the model's class names (a model without
    classes, an encoder, takes the folder's own sub-folders: labels are not used)."""
    from ..data.datasets import BUILTIN, ImageFolder, builtin_splits
    from ..data.imagenet import folder_classes

    transform = trained.eval_preprocess().transform()
    if data in BUILTIN:
        return builtin_splits(data, transform, transform).train
    if Path(data).is_dir():
        classes = folder_classes(trained.classes) if trained.classes else None
        return ImageFolder(data, transform, classes=classes)
    raise MobileNetError(
        f"data not found: {data} (an image folder, or one of: {', '.join(BUILTIN)})"
    )


def calibration_batches(
    dataset: Dataset, images: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Batches of 32 from ``images`` images of ``dataset`` drawn at random (all of them
    when it holds fewer: see :func:`calibration_count`)."""
    order = torch.randperm(len(dataset), generator=generator)
    subset = Subset(dataset, order[: min(images, len(dataset))].tolist())
    for batch, _ in DataLoader(subset, batch_size=32):
        yield batch


def calibration_count(
    dataset: Dataset,
    images: int,
    data: str = "the data",
    progress: Callable[[str], None] | None = None,
) -> int:
    """How many images calibration uses: ``images``, or all there are (``progress`` is told)."""
    available = len(dataset)  # type: ignore[arg-type]
    if available == 0:
        raise MobileNetError(f"no calibration images in {data}")
    if available < images and progress:
        progress(f"{data} holds {available} images: calibrating on all {available}")
    return min(images, available)


def observe(observed: torch.nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """PT2E observers run over ``batches``: the images seen, and the first three."""
    seen, first = 0, None
    for batch in batches:
        with torch.no_grad():
            observed(batch)
        seen, first = seen + batch.shape[0], batch[:3] if first is None else first
    if first is None:
        raise MobileNetError("int8 calibration needs at least one image")
    return seen, first


def calibrated_export(
    export_int8: Callable[..., float],
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, float]:
    """``export_int8`` of ``trained`` calibrated on ``calibration_images`` random images of
    ``data`` (all, when fewer: ``progress`` is told); the images used, the max abs diff."""
    dataset = calibration_dataset(trained, data)
    used = calibration_count(dataset, calibration_images, data, progress)
    batches = calibration_batches(dataset, used, torch.Generator().manual_seed(seed))
    metadata = trained.model_card().metadata()  # its classes, as it was calibrated
    return used, export_int8(trained.model, batches, out, trained.resolution, metadata)
