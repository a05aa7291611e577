"""``mobilenet train|eval|predict`` for segmentation models (routed here by :mod:`.train`).

``train`` takes ``--resolution`` as the square training crop (and evaluation input);
``eval`` prints mIoU, per-class IoU and pixel accuracy; ``predict`` writes each image's
index mask and colour overlay into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import MobileNetError
from .args import dense_task_config

__all__ = ["eval_segmenter", "segment", "segmentation_config", "trained_line"]


def segmentation_config(args: argparse.Namespace):
    """The run ``mobilenet train`` asks for, as a :class:`SegTrainConfig`."""
    from ..tasks.segmentation import SegTrainConfig

    size = args.resolution  # an int: a square crop; or (height, width)
    crop = (size, size) if isinstance(size, int) else None if size is None else tuple(size)
    return dense_task_config(
        SegTrainConfig, args, crop_size=crop, aux_loss=args.aux_loss, num_classes=args.num_classes
    )


def trained_line(args: argparse.Namespace) -> tuple[Any, str]:
    """Train as ``args`` say; the result and its line for the summary."""
    from ..tasks.segmentation import train_segmenter

    result = train_segmenter(segmentation_config(args))
    best = (
        f"mIoU {result.best_miou:.3f} (epoch {result.best_epoch})"
        if result.best_miou is not None
        else "-"
    )
    return result, f"best held-out {best}"


def eval_segmenter(args: argparse.Namespace) -> int:
    from ..segmentation.predict import evaluate_on, load_segmenter
    from ..train.distributed import resolve_device

    trained = load_segmenter(args.weights, args.model)
    trained.model.to(resolve_device(args.device or "cpu"))
    metrics = evaluate_on(trained, args.data, args.batch_size or 16, args.workers or 0)
    if args.json:
        print(json.dumps(metrics))
        return 0
    height, width = trained.size
    print(
        f"{trained.model.config.name} on {args.data}: mIoU {metrics['miou']:.3f}  "
        f"pixel accuracy {metrics['pixel_accuracy']:.3f}  ({metrics['images']} images, "
        f"network input {height}x{width})"
    )
    for name, iou in metrics["iou"].items():
        print(f"  {name:<16} {'-' if iou is None else f'{iou:.3f}'}")
    return 0


def segment(args: argparse.Namespace) -> int:
    from ..segmentation.predict import load_segmenter, segment_images

    if args.draw is None:
        raise MobileNetError("predict writes a segmentation model's masks: give --out FOLDER")
    trained = load_segmenter(args.weights, args.model)
    results = segment_images(trained, args.images, args.draw)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        shares = ", ".join(f"{name} {share:.1%}" for name, share in result["classes"].items())
        print(f"{result['image']}: {shares}\n  -> {result['mask']}, {result['overlay']}")
    return 0
