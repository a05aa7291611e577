"""COCO mAP of a detector on a dataset, computed by pycocotools.

``map`` is COCO's primary metric, AP averaged over IoU thresholds 0.50:0.05:0.95 (and
over classes); ``map_50`` is AP at IoU 0.5 (PASCAL VOC's metric). Both over at most 100
detections per image, as COCO scores them.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..extras import require
from .data import CocoDetection, collate, eval_transform

__all__ = ["coco_map", "evaluate_detector", "predict_dataset", "prediction_layers"]


def prediction_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that give a detector's class logits and box offsets: where NaN shows,
    before the post-processing drops every box whose score is not above the threshold."""
    return [*model.classification, *model.regression]  # type: ignore[misc]


def coco_map(ground_truth: dict[str, Any], detections: list[dict[str, Any]]) -> dict[str, float]:
    """``{"map", "map_50", "map_75"}`` of COCO-format ``detections`` (``image_id``,
    ``category_id``, ``bbox = [x, y, w, h]``, ``score``) against a COCO dict."""
    COCO = require("pycocotools.coco", "detection", "COCO mAP").COCO
    COCOeval = require("pycocotools.cocoeval", "detection", "COCO mAP").COCOeval

    if not detections or not ground_truth["annotations"]:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
        gt = COCO()
        gt.dataset = ground_truth
        gt.createIndex()
        result = gt.loadRes(detections)
        evaluator = COCOeval(gt, result, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats[:3]]  # -1: no ground truth
    return {"map": stats[0], "map_50": stats[1], "map_75": stats[2]}


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: CocoDetection,
    batch_size: int = 16,
    workers: int = 0,
    indices: list[int] | None = None,
    source: str | None = None,
) -> list[dict[str, Any]]:
    """The model's detections on ``dataset`` (or the ``indices`` of it), COCO-format,
    labels as category ids of :meth:`CocoDetection.coco_ground_truth`. With ``source``
    (the weights file), NaN or infinite logits or box offsets are an error naming it:
    they would leave no box above the score threshold, a mAP of 0 that looks measured."""
    from torch.utils.data import Subset

    from ..train.evaluate import finite_outputs

    checked = prediction_layers(model) if source is not None else []  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    data = Subset(dataset, indices) if indices is not None else dataset
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    try:
        for images, targets in loader:
            with finite_outputs(checked, source or ""):
                results = model([image.to(device) for image in images])
            for result, target in zip(results, targets, strict=True):
                boxes = result["boxes"].cpu()
                boxes[:, 2:] -= boxes[:, :2]
                for box, score, label in zip(
                    boxes.tolist(),
                    result["scores"].tolist(),
                    result["labels"].tolist(),
                    strict=True,
                ):
                    out.append(
                        {
                            "image_id": target["image_id"],
                            "category_id": label,
                            "bbox": [round(v, 3) for v in box],
                            "score": round(score, 5),
                        }
                    )
    finally:
        model.train(was_training)
    return out


def evaluate_detector(
    model: nn.Module,
    dataset: CocoDetection,
    batch_size: int = 16,
    workers: int = 0,
    indices: list[int] | None = None,
    source: str | None = None,
) -> dict[str, float]:
    """COCO mAP of ``model`` on ``dataset`` (images at their own size; see
    :func:`coco_map`), with ``images``, the number of images scored; ``source``: see
    :func:`predict_dataset`."""
    require("pycocotools", "detection", "COCO mAP")  # before the predictions
    if dataset.transform is None:
        dataset.transform = eval_transform()
    detections = predict_dataset(model, dataset, batch_size, workers, indices, source)
    gt = dataset.coco_ground_truth()
    if indices is not None:
        ids = {dataset.images[i]["id"] for i in indices}
        gt = {
            **gt,
            "images": [im for im in gt["images"] if im["id"] in ids],
            "annotations": [a for a in gt["annotations"] if a["image_id"] in ids],
        }
    metrics = coco_map(gt, detections)
    return {**metrics, "images": float(len(gt["images"]))}
