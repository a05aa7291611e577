"""``mobilenet detect {train,eval,predict}``: the detection commands."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..cli import _non_negative_int, _positive_float, _positive_int
from ..errors import MobileNetError
from ..models.registry import list_models

__all__ = ["add_detect_parser", "export_detector"]


def _detector(text: str) -> str:
    if text not in list_models(task="detection"):
        raise argparse.ArgumentTypeError(
            f"unknown detector {text!r}; choose from: {', '.join(list_models(task='detection'))}"
        )
    return text


def add_detect_parser(sub: argparse._SubParsersAction) -> None:
    detect = sub.add_parser("detect", help="object detection with SSDLite: train, eval, predict")
    dsub = detect.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")

    p = dsub.add_parser(
        "train",
        help="train a detector on a COCO-format folder or mnist-det",
        description="Train on one process, or on many under torchrun "
        "(torchrun --nproc-per-node N -m mobilenet detect train ...).",
    )
    p.add_argument("--model", type=_detector, default="ssdlite_mobilenet_v3_small")
    p.add_argument("--width-mult", type=_positive_float, default=1.0)
    p.add_argument("--data", required=True, help="folder with annotations.json, or mnist-det")
    p.add_argument("--val-data", help="held-out folder (default for mnist-det: its val split)")
    p.add_argument("--image-size", type=_positive_int, default=320, help="network input")
    p.add_argument(
        "--min-scale", type=_positive_float, default=0.2,
        help="smallest default box, as a fraction of the input (SSD: 0.2)",
    )  # fmt: skip
    p.add_argument(
        "--max-scale", type=_positive_float, default=0.95,
        help="largest default box of the last map (SSD: 0.95)",
    )  # fmt: skip
    p.add_argument("--epochs", type=_positive_int, default=30)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="global batch size")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=_positive_float, default=None, help="default: sgd 0.05, adamw 3e-3")
    p.add_argument("--weight-decay", type=float, default=4e-5)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument(
        "--focal", action="store_true", help="focal loss instead of hard negative mining"
    )
    p.add_argument("--augment", choices=["ssd", "light", "none"], default="ssd")
    p.add_argument(
        "--cache",
        action="store_true",
        help="decode and resize the training images once, keep them in memory "
        "(with --augment light or none)",
    )
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--flip", dest="flip", action="store_true", default=None)
    flip.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--eval-every", type=_positive_int, default=1, help="epochs between evaluations")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=_non_negative_int, default=2, help="data loading processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    p.set_defaults(func=cmd_detect_train)

    p = dsub.add_parser("eval", help="COCO mAP of trained weights on a dataset (pycocotools)")
    p.add_argument("--weights", required=True, help="best.safetensors, or a torchvision SSDLite")
    p.add_argument("--data", required=True, help="folder with annotations.json, or mnist-det")
    p.add_argument("--model", type=_detector, help="for torchvision state dicts")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_detect_eval)

    p = dsub.add_parser("predict", help="detect objects in images; draw them with --out")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, help="best.safetensors, or a torchvision SSDLite")
    p.add_argument("--model", type=_detector, help="for torchvision state dicts")
    p.add_argument("--min-score", type=float, default=0.5, help="report detections above this")
    p.add_argument("--out", help="folder for the images with their boxes drawn (PNG)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_detect_predict)


def cmd_detect_train(args: argparse.Namespace) -> int:
    from .train import DetectTrainConfig, train_detector

    lr = args.lr if args.lr is not None else {"sgd": 0.05, "adamw": 3e-3}[args.optimizer]
    cfg = DetectTrainConfig(
        model=args.model,
        data=args.data,
        out=Path(args.out),
        width_mult=args.width_mult,
        image_size=args.image_size,
        min_scale=args.min_scale,
        max_scale=args.max_scale,
        val_data=args.val_data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        focal=args.focal,
        augment=args.augment,
        cache=args.cache,
        flip=args.flip,
        eval_every=args.eval_every,
        seed=args.seed,
        workers=args.workers,
        device=args.device,
        resume=args.resume,
        progress=not args.quiet,
    )
    result = train_detector(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        best = (
            f"mAP {result.best_map:.3f}, mAP@.5 {result.best_map_50:.3f} "
            f"(epoch {result.best_epoch})"
            if result.best_map is not None
            else "-"
        )
        print(
            f"done in {result.seconds:.0f} s: best held-out {best}\n"
            f"  weights  {result.out / 'best.safetensors'}\n"
            f"  curves   {result.out / 'curves.png'}\n"
            f"  metrics  {result.out / 'metrics.csv'}"
        )
    return 0


def cmd_detect_eval(args: argparse.Namespace) -> int:
    from .data import CocoDetection, dataset_root, eval_transform
    from .evaluate import evaluate_detector
    from .predict import load_detector

    trained = load_detector(args.weights, args.model)
    split = "val" if args.data == "mnist-det" else "train"
    dataset = CocoDetection(dataset_root(args.data, split), eval_transform(), trained.categories)
    metrics = evaluate_detector(trained.model, dataset, args.batch_size)
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


def cmd_detect_predict(args: argparse.Namespace) -> int:
    from .predict import detect_images, load_detector

    trained = load_detector(args.weights, args.model)
    results = detect_images(trained, args.images, args.out, args.min_score)
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


def export_detector(args: argparse.Namespace) -> int:
    """``mobilenet export --model ssdlite_...``: raw outputs and default boxes, as ONNX."""
    from ..export.onnx import DEFAULT_OPSET
    from ..models import create_model
    from .export import export_detector_onnx

    if args.format != "onnx":
        raise MobileNetError("detectors export to ONNX only (--format onnx)")
    metadata = {}
    if args.weights:
        from .predict import load_detector

        trained = load_detector(args.weights, args.model)
        if trained.model.config.name != args.model:
            raise MobileNetError(
                f"{args.weights} holds {trained.model.config.name}, not {args.model}"
            )
        model = trained.model
        metadata["categories"] = json.dumps([c.name for c in trained.categories])
    else:  # random initialisation: for checking a deployment path, not for use
        kwargs: dict = {"width_mult": args.width_mult}
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        if args.resolution is not None:
            kwargs["image_size"] = args.resolution
        model = create_model(args.model, **kwargs)
    diff = export_detector_onnx(model, args.out, args.opset or DEFAULT_OPSET, metadata)
    size = model.config.image_size
    print(
        f"wrote {args.out}: {model.config.name} at {size}x{size}, dynamic batch; outputs "
        f"logits, box_codes, default_boxes ({len(model.anchors())} boxes); ONNX Runtime vs "
        f"PyTorch max abs difference {diff:.2e}"
    )
    return 0
