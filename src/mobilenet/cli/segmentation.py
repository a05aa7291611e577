"""``mobilenet train|eval|predict|export`` for segmentation models (found by :mod:`.tasks`).

``train`` takes ``--resolution`` as the square training crop (and evaluation input);
``eval`` prints mIoU, per-class IoU and pixel accuracy; ``predict`` writes each image's
index mask and colour overlay into ``--out``; ``export`` takes ``--resolution HxW``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ..card import ModelCard
from ..errors import MobileNetError
from ..formats import Format
from ..limits import check_memory
from .args import dense_task_config
from .tasks import EXPORT_CHECK, TaskCommands, check_num_classes

__all__ = ["COMMANDS", "SegmentationCommands", "label_maps", "segmentation_config"]


class SegmentationCommands(TaskCommands):
    name = "segmentation"
    flags: Mapping[str, str] = {
        "flip": "--flip/--no-flip",
        "draw": "--out",
        "aux_loss": "--aux-loss",
        "num_classes": "--num-classes",
    }
    keeps_settings = True

    def train(self, args: argparse.Namespace) -> tuple[Any, str]:
        from ..segmentation.task import train_segmenter

        result = train_segmenter(segmentation_config(args))
        best = (
            f"mIoU {result.best_miou:.3f} (epoch {result.best_epoch})"
            if result.best_miou is not None
            else "-"
        )
        return result, f"best held-out {best}"

    def evaluate(self, args: argparse.Namespace) -> int:
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

    def predict(self, args: argparse.Namespace) -> int:
        from ..segmentation.predict import load_segmenter, segment_images

        if args.draw is None:
            raise MobileNetError("predict writes a segmentation model's masks: give --out FOLDER")
        trained = load_segmenter(args.weights, args.model)
        results = segment_images(trained, args.images, args.draw, label_maps(trained.model))
        if args.json:
            print(json.dumps(results, indent=2))
            return 0
        for result in results:
            shares = ", ".join(f"{name} {share:.1%}" for name, share in result["classes"].items())
            print(f"{result['image']}: {shares}\n  -> {result['mask']}, {result['overlay']}")
        return 0

    def trained_for_export(self, args: argparse.Namespace, fmt: Format):
        """A trained segmentation model, its input size (``--resolution``, else the one it
        was trained at) and the card its file keeps (its class names)."""
        from ..export.onnx import input_size
        from ..segmentation.predict import load_segmenter

        trained = load_segmenter(args.weights, args.model, args.width_mult)
        check_num_classes(args, trained.model.num_classes)
        size = args.resolution or trained.size
        check_memory(trained.model, size, *EXPORT_CHECK)
        card = ModelCard(
            config=trained.model.config.to_dict(),
            task=self.name,
            classes=tuple(trained.classes),
            input_size=input_size(size),
        )
        return trained.model, size, card


def label_maps(model: Any):
    """What ``predict`` makes its masks with: a PyTorch model's memory-efficient executor
    of label maps (the same masks, without the logits at the image's size); None, the
    model's own forward, for an ONNX file or a model the executor does not run."""
    from ..memory import memory_efficient
    from ..segmentation.model import SegmentationModel

    if not isinstance(model, SegmentationModel):
        return None
    try:
        return memory_efficient(model, output="labels")
    except MobileNetError:  # a layer it has no form of: the standard forward runs it
        return None


def segmentation_config(args: argparse.Namespace):
    """The run ``mobilenet train`` asks for, as a :class:`SegTrainConfig`."""
    from ..segmentation.task import SegTrainConfig

    size = args.resolution  # an int: a square crop; or (height, width)
    crop = (size, size) if isinstance(size, int) else None if size is None else tuple(size)
    return dense_task_config(
        SegTrainConfig, args, crop_size=crop, aux_loss=args.aux_loss, num_classes=args.num_classes
    )


COMMANDS = SegmentationCommands()
