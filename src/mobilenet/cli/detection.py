"""``mobilenet train|eval|predict|export`` for detectors (found by :mod:`.tasks`).

``eval`` prints COCO mAP; ``predict`` prints each image's objects and draws them into
``--out`` when given; ``export`` writes the raw outputs and default boxes as ONNX.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ..card import ModelCard
from ..errors import MobileNetError
from ..formats import Format
from ..limits import check_memory, meta_model
from .args import dense_task_config, model_kwargs
from .tasks import EXPORT_CHECK, TaskCommands, check_num_classes

__all__ = ["COMMANDS", "DetectionCommands", "detection_config"]


class DetectionCommands(TaskCommands):
    name = "detection"
    flags: Mapping[str, str] = {
        "min_scale": "--min-scale",
        "max_scale": "--max-scale",
        "focal": "--focal",
        "augment": "--augment",
        "cache": "--cache",
        "flip": "--flip/--no-flip",
        "min_score": "--min-score",
        "draw": "--out",
    }
    keeps_settings = True
    square_input = "a detector's input is square: --resolution N"

    def train(self, args: argparse.Namespace) -> tuple[Any, str]:
        from ..detection.task import train_detector

        result = train_detector(detection_config(args))
        best = (
            f"mAP {result.best_map:.3f}, mAP@.5 {result.best_map_50:.3f} "
            f"(epoch {result.best_epoch})"
            if result.best_map is not None
            else "-"
        )
        return result, f"best held-out {best}"

    def evaluate(self, args: argparse.Namespace) -> int:
        """COCO mAP of ``--weights`` on ``--data``."""
        from ..detection.predict import evaluate_on, load_detector

        trained = load_detector(args.weights, args.model, args.width_mult)
        metrics = evaluate_on(
            trained, args.data, args.batch_size or 16, args.workers or 0, args.device or "cpu"
        )
        if args.json:
            print(json.dumps(metrics))
        else:
            size = trained.model.config.image_size
            print(
                f"{trained.model.config.name} on {args.data}: mAP@[.5:.95] {metrics['map']:.3f}  "
                f"mAP@.5 {metrics['map_50']:.3f}  mAP@.75 {metrics['map_75']:.3f}  "
                f"({int(metrics['images'])} images, network input {size}x{size})"
            )
        return 0

    def predict(self, args: argparse.Namespace) -> int:
        """The objects in each image, drawn into ``--out`` when given."""
        from ..detection.predict import detect_images, load_detector

        trained = load_detector(args.weights, args.model, args.width_mult)
        min_score = 0.5 if args.min_score is None else args.min_score
        results = detect_images(trained, args.images, args.draw, min_score)
        if args.json:
            print(json.dumps(results, indent=2))
            return 0
        for result in results:
            drawn = f"  -> {result['drawn']}" if "drawn" in result else ""
            print(f"{result['image']}: {len(result['detections'])} objects{drawn}")
            for d in result["detections"]:
                box = ", ".join(f"{v:.0f}" for v in d["box"])
                print(f"  {d['score']:6.2%}  {d['label']:<12} [{box}]")
        return 0

    def export(self, args: argparse.Namespace, fmt: Format) -> int:
        """A detector's raw outputs and default boxes, as ONNX."""
        from ..detection.export import export_detector_onnx
        from ..export.onnx import DEFAULT_OPSET

        model, card = _trained(args) if args.weights else _random(args)
        diff = export_detector_onnx(model, args.out, args.opset or DEFAULT_OPSET, card.metadata())
        size = model.config.image_size
        print(
            f"wrote {args.out}: {model.config.name} at {size}x{size}, dynamic batch; outputs "
            f"logits, box_codes, default_boxes ({len(model.anchors())} boxes); ONNX Runtime vs "
            f"PyTorch max abs difference {diff:.2e}"
        )
        return 0


def detection_config(args: argparse.Namespace):
    """The run ``mobilenet train`` asks for, as a :class:`DetectTrainConfig`."""
    from ..detection.task import DetectTrainConfig

    return dense_task_config(
        DetectTrainConfig,
        args,
        image_size=args.resolution,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        focal=args.focal,
        augment=args.augment,
        cache=args.cache,
    )


def _trained(args: argparse.Namespace) -> tuple[Any, ModelCard]:
    """The detector of ``--weights`` and the card its ONNX file keeps (its categories)."""
    from ..detection.predict import load_detector

    trained = load_detector(args.weights, args.model, args.width_mult)
    check_num_classes(args, trained.model.num_classes)
    size = trained.model.config.image_size  # its default boxes are laid out for it
    if args.resolution is not None and args.resolution != size:
        raise MobileNetError(
            f"{args.weights} holds a detector of {size}x{size} images, not {args.resolution}"
        )
    categories = trained.categories
    card = ModelCard(
        task="detection",
        classes=tuple(c.name for c in categories),
        category_ids=tuple(c.id for c in categories),
    )
    check_memory(trained.model, size, *EXPORT_CHECK)
    return trained.model, card


def _random(args: argparse.Namespace) -> tuple[Any, ModelCard]:
    """A randomly initialised detector: for checking a deployment path, not for use."""
    from ..models import create_model

    kwargs = model_kwargs(args)
    if args.resolution is not None:
        kwargs["image_size"] = args.resolution
    meta = meta_model(args.model, **kwargs)
    check_memory(meta, meta.config.image_size, *EXPORT_CHECK)
    return create_model(args.model, **kwargs), ModelCard(task="detection")


COMMANDS = DetectionCommands()
