"""``mobilenet train|eval|predict`` for detectors (routed here by :mod:`.train`).

``eval`` prints COCO mAP; ``predict`` prints each image's objects and draws them into
``--out`` when given.
"""

from __future__ import annotations

import argparse
import json

from .args import dense_task_config

__all__ = ["detect", "detection_config", "eval_detector"]


def detection_config(args: argparse.Namespace):
    """The run ``mobilenet train`` asks for, as a :class:`DetectTrainConfig`."""
    from ..tasks.detection import DetectTrainConfig

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


def eval_detector(args: argparse.Namespace) -> int:
    """COCO mAP of ``--weights`` on ``--data``."""
    from ..detection.builtin import dataset_root
    from ..detection.data import CocoDetection, eval_transform
    from ..detection.evaluate import evaluate_detector
    from ..detection.predict import load_detector
    from ..train.distributed import resolve_device

    trained = load_detector(args.weights, args.model, args.width_mult)
    split = "val" if args.data == "mnist-det" else "train"
    dataset = CocoDetection(dataset_root(args.data, split), eval_transform(), trained.categories)
    model = trained.model.to(resolve_device(args.device or "cpu"))
    metrics = evaluate_detector(
        model, dataset, args.batch_size or 16, args.workers or 0, source=args.weights
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


def detect(args: argparse.Namespace) -> int:
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
