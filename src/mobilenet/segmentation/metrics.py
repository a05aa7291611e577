"""Segmentation scores: mIoU, per-class IoU and pixel accuracy, from one confusion matrix
accumulated over a whole held-out set (PASCAL VOC's convention, not a mean of per-image
scores).

For class ``c``, IoU = TP / (TP + FP + FN), counted over every scored pixel of the set;
pixels marked 255 in the mask are not scored. A class absent from both the predictions
and the masks (TP + FP + FN = 0) has no IoU (``None``) and is left out of the mean, as
torchmetrics' ``MulticlassJaccardIndex(average="macro")`` does; a class that is present
in either counts, with IoU 0 where it was never right. Pixel accuracy is the share of
scored pixels whose class is right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import IGNORE, Size, eval_collate
from .heads import resize

__all__ = ["ConfusionMatrix", "evaluate_segmenter", "predict_classes"]


class ConfusionMatrix:
    """``matrix[t, p]``: the number of pixels of class ``t`` predicted as ``p``."""

    def __init__(self, num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """Count the pixels of a prediction and its mask (same shape; 255 not counted)."""
        k = self.num_classes
        keep = target != IGNORE
        index = target[keep].long() * k + predicted[keep].long()
        self.matrix += torch.bincount(index, minlength=k * k).reshape(k, k)

    def scores(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        """``{"miou", "pixel_accuracy", "iou": {class: IoU or None}, "pixels"}``."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
        names = list(classes) if classes is not None else [str(i) for i in range(len(tp))]
        total = m.sum().item()
        return {
            "miou": iou[present].mean().item() if present.any() else 0.0,
            "pixel_accuracy": tp.sum().item() / total if total else 0.0,
            "iou": {
                name: (round(v, 6) if ok else None)
                for name, v, ok in zip(names, iou.tolist(), present.tolist(), strict=True)
            },
            "pixels": int(total),
        }


@torch.no_grad()
def predict_classes(model: nn.Module, images: list[torch.Tensor], size: Size) -> list[torch.Tensor]:
    """Each normalised image ``[3, h, w]`` resized to the model's input ``size``, run as one
    batch, its logits resized back to ``h x w``: the class of every pixel, ``[h, w]``."""
    device = next(model.parameters()).device
    batch = torch.stack([resize(i[None].to(device), size)[0] for i in images])
    logits = model(batch)["out"]
    return [
        resize(logit[None], image.shape[-2:])[0].argmax(0).cpu()
        for logit, image in zip(logits, images, strict=True)
    ]


@torch.no_grad()
def evaluate_segmenter(
    model: nn.Module,
    dataset: Dataset,
    size: Size,
    num_classes: int,
    batch_size: int = 16,
    sampler: Sampler[int] | None = None,
    workers: int = 0,
) -> ConfusionMatrix:
    """The confusion matrix of ``model`` on ``dataset`` (or the part ``sampler`` picks; a
    caller with several processes adds theirs up), with images at ``size``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = ConfusionMatrix(num_classes, device)
    loader = DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=workers, collate_fn=eval_collate
    )
    try:
        for images, masks in loader:
            for predicted, mask in zip(predict_classes(model, images, size), masks, strict=True):
                confusion.update(predicted.to(device), mask.to(device))
    finally:
        model.train(was_training)
    return confusion
