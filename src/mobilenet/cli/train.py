"""``mobilenet train``, ``eval``, ``predict``: one command for every task.

The model's registered task (or, for ``eval`` and ``predict``, the checkpoint's) decides
what runs; a flag that only another task uses is refused rather than ignored.
``mobilenet detect train|eval|predict`` is the same commands with a detector by default.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import MobileNetError
from ..limits import check_memory
from ..models import model_task
from .args import (
    finite_float,
    is_main_process,
    model_name,
    non_negative_int,
    positive_float,
    positive_int,
    resolution,
    run_settings,
    seed,
    width,
)
from .preprocess import PREPROCESS_FLAGS, add_preprocess_args, apply_preprocess, say_preprocess

__all__ = ["add_detect_alias", "add_parsers", "checkpoint_task_of", "saved_settings"]

# Flags that only some tasks use: dest -> (task or tasks, flag). The others are shared.
TASK_FLAGS = {
    "recipe": ("classification", "--recipe"),
    "val_fraction": ("classification", "--val-fraction"),
    "pretrained": ("classification", "--pretrained"),
    "channels_last": ("classification", "--no-channels-last"),
    "top": ("classification", "--top"),
    "engine": ("classification", "--engine"),
    "min_scale": ("detection", "--min-scale"),
    "max_scale": ("detection", "--max-scale"),
    "focal": ("detection", "--focal"),
    "augment": ("detection", "--augment"),
    "cache": ("detection", "--cache"),
    "flip": (("detection", "segmentation"), "--flip/--no-flip"),
    "min_score": ("detection", "--min-score"),
    "draw": (("detection", "segmentation"), "--out"),
    "aux_loss": ("segmentation", "--aux-loss"),
    "num_classes": ("segmentation", "--num-classes"),
    **PREPROCESS_FLAGS,
}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_train(sub, "mobilenet_v3_small", None)
    _add_eval(sub, None)
    _add_predict(sub, None)


def add_detect_alias(sub: argparse._SubParsersAction) -> None:
    detect = sub.add_parser("detect", help="object detection: train, eval, predict (an alias)")
    dsub = detect.add_subparsers(dest="detect_command", required=True, metavar="COMMAND")
    _add_train(dsub, "ssdlite_mobilenet_v3_small", "detection")
    _add_eval(dsub, "detection")
    _add_predict(dsub, "detection")


def _add_train(sub: argparse._SubParsersAction, default_model: str, task: str | None) -> None:
    from ..train.recipes import RECIPES

    p = sub.add_parser(
        "train",
        help="train a classifier, detector or segmentation model (the model decides)",
        description="Train on one process, or on many under torchrun "
        "(torchrun --nproc-per-node N -m mobilenet train ...). Classifiers train on an "
        "image folder (one sub-folder per class) or mnist/digits; detectors on a "
        "COCO-format folder (annotations.json) or mnist-det; segmentation models on a "
        "PASCAL VOC folder, an images/ + masks/ folder or mnist-seg.",
    )
    p.set_defaults(func=cmd_train, task=task)
    p.add_argument("--model", type=model_name(task), default=default_model)
    p.add_argument("--width-mult", type=width, default=1.0, help="width multiplier alpha")
    p.add_argument(
        "--data",
        required=True,
        help="image folder, tar shards ('shards/train-{000000..000127}.tar'), COCO folder "
        "or built-in set",
    )
    p.add_argument("--val-data", help="separate held-out folder or shards")
    p.add_argument("--epochs", type=positive_int, help="default: the recipe's (detection: 30)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size (all processes)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: the recipe's)")
    p.add_argument("--optimizer", choices=["sgd", "adamw", "rmsprop_tf"], help="(needs --lr)")
    p.add_argument("--weight-decay", type=finite_float, help="default: the recipe's")
    p.add_argument("--warmup-epochs", type=finite_float, help="linear warm-up before the decay")
    p.add_argument("--ema-decay", type=positive_float, help="keep an EMA of the weights")
    p.add_argument("--resolution", "--image-size", dest="resolution", type=resolution,
                   help="input size (default: the recipe's; detection: 320)")  # fmt: skip
    p.add_argument("--eval-every", type=positive_int, default=1, help="epochs between evals")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    c = p.add_argument_group("classification")
    c.add_argument("--recipe", help=f"one of: {', '.join(RECIPES)} (default: demo)")
    c.add_argument("--val-fraction", type=finite_float, help="share of --data held out (0.1)")
    c.add_argument("--pretrained", help="start from these weights (classifier reset)")
    c.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    d = p.add_argument_group("detection")
    d.add_argument("--min-scale", type=positive_float, help="smallest default box (SSD: 0.2)")
    d.add_argument("--max-scale", type=positive_float, help="largest default box (SSD: 0.95)")
    d.add_argument("--focal", action="store_true", default=None, help="focal loss")
    d.add_argument("--augment", choices=["ssd", "light", "none"], help="default: ssd")
    d.add_argument(
        "--cache",
        action="store_true",
        default=None,
        help="decode and resize the training images once (--augment light/none)",
    )
    flip = d.add_mutually_exclusive_group()
    flip.add_argument("--flip", dest="flip", action="store_true", default=None)
    flip.add_argument("--no-flip", dest="flip", action="store_false")
    s = p.add_argument_group("segmentation")
    s.add_argument("--aux-loss", action="store_true", default=None,
                   help="train DeepLabv3's auxiliary head too (loss + 0.5 x its loss)")  # fmt: skip
    s.add_argument("--num-classes", type=positive_int, default=None,
                   help="the classes of masks without a classes.txt (needed for 16-bit "
                   "masks; default: the largest value of 8-bit masks + 1)")  # fmt: skip


def _add_eval(sub: argparse._SubParsersAction, task: str | None) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5 of a classifier, COCO mAP of a detector, mIoU of a segmenter"
    )
    p.set_defaults(func=cmd_eval, task=task)
    p.add_argument("--weights", required=True, help="best.safetensors, or any checkpoint")
    p.add_argument("--data", required=True, help="image folder, COCO folder or built-in set")
    p.add_argument("--model", type=model_name(task), help="for torchvision/timm checkpoints")
    p.add_argument("--batch-size", type=positive_int, help="default: 64 (detection: 16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    c = p.add_argument_group("classification")
    c.add_argument("--width-mult", type=width, default=None, help="width multiplier alpha")
    c.add_argument("--resolution", type=resolution, default=None, help="input size")
    c.add_argument("--workers", type=non_negative_int, default=None, help="default 0")
    c.add_argument("--device", default=None, help="default: cpu")
    add_preprocess_args(p)


def _add_predict(sub: argparse._SubParsersAction, task: str | None) -> None:
    from ..inference import PREDICT_ENGINES

    p = sub.add_parser(
        "predict", help="classify images, detect the objects in them or segment them"
    )
    p.set_defaults(func=cmd_predict, task=task)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, help="best.safetensors, or any checkpoint")
    p.add_argument("--model", type=model_name(task), help="for torchvision/timm checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON")
    c = p.add_argument_group("classification")
    c.add_argument("--width-mult", type=width, default=None, help="width multiplier alpha")
    c.add_argument("--resolution", type=resolution, default=None, help="input size")
    c.add_argument("--top", type=positive_int, default=None, help="classes per image (5)")
    c.add_argument("--engine", choices=PREDICT_ENGINES, default=None,
                   help="auto (default: the fastest float engine that bench --save "
                   "measured on this machine, else ONNX Runtime where installed), onnxruntime, "
                   "executorch, eager-fused, eager; an exported file runs on its own")  # fmt: skip
    d = p.add_argument_group("detection")
    d.add_argument("--min-score", type=finite_float, default=None, help="report above (0.5)")
    d.add_argument("--out", dest="draw", help="folder for the images with their boxes drawn "
                   "(segmentation: for the masks and overlays)")  # fmt: skip
    add_preprocess_args(p)


# --------------------------------------------------------------------------- which task


def _check_flags(args: argparse.Namespace, task: str, what: str) -> None:
    """Refuse a flag of another task: it would be ignored."""
    if args.task is not None and task != args.task:
        raise MobileNetError(f"{what} is a {task} model; `mobilenet detect` takes detectors")
    for dest, (owner, flag) in TASK_FLAGS.items():
        owners = (owner,) if isinstance(owner, str) else owner
        if task not in owners and getattr(args, dest, None) is not None:
            owned = " and ".join(owners)
            raise MobileNetError(f"{flag} applies to {owned} models; {what} is a {task} model")
    if task == "classification" or args.func is cmd_train:
        return
    # eval runs on --device with --workers loading the data, as a classifier's does.
    if args.func is not cmd_eval:
        for dest in ("workers", "device"):
            if getattr(args, dest, None) is not None:
                flag = "--" + dest.replace("_", "-")
                raise MobileNetError(f"{flag} applies to classifiers; {what} is a {task} model")
    _check_saved_settings(args, task, what)


def _check_saved_settings(args: argparse.Namespace, task: str, what: str) -> None:
    """A detector or segmentation model keeps its width and input size in its file:
    ``--width-mult`` and ``--resolution`` may repeat them, not change them (nor be given
    for a file that does not say them: torchvision's)."""
    from ..deployed import check_requested
    from ..models.pretrained import resolve_weights

    if args.width_mult is None and args.resolution is None:
        return
    path = resolve_weights(args.weights)
    config, size = saved_settings(path)
    for dest, known in (("width_mult", config), ("resolution", size)):
        if getattr(args, dest) is not None and known is None:
            flag = "--" + dest.replace("_", "-")
            raise MobileNetError(f"{flag} applies to classifiers; {what} is a {task} model")
    if config is not None:
        check_requested(path, config, None, args.width_mult)
    if args.resolution is not None and size != (args.resolution, args.resolution):
        raise MobileNetError(
            f"{path} takes {size[0]}x{size[1]} images, not {args.resolution}"  # type: ignore[index]
        )


def saved_settings(path: Path) -> tuple[dict | None, tuple[int, int] | None]:
    """The model config and input ``(height, width)`` a detector's or segmentation
    model's file names (each None where it names none)."""
    from ..weights import FORMAT, saved_config
    from ..weights.io import read_metadata

    if path.suffix == ".onnx":  # an exported file keeps its config as ours do
        from ..export.onnx import onnx_session
        from ..export.onnx import read_metadata as read_onnx_metadata

        metadata = {"format": FORMAT, **read_onnx_metadata(onnx_session(path))}
    else:
        metadata = read_metadata(path)
    try:
        config = saved_config(metadata)
    except MobileNetError:  # the loader names the damage, with the file
        return None, None
    text = metadata.get("image_size") or metadata.get("resolution") or ""
    if config is not None and isinstance(config.get("image_size"), int):
        text = str(config["image_size"])  # a detector's
    sides = text.split("x") if text else []
    if not all(side.isdigit() for side in sides) or len(sides) not in (1, 2):
        return config, None
    height, width = int(sides[0]), int(sides[-1])
    return config, (height, width)


def checkpoint_task_of(weights: str, model: str | None) -> str:
    """The task of ``--model``, else of the model the checkpoint holds (an exported
    file's, from its metadata)."""
    if model is not None:
        return model_task(model)
    from ..models.pretrained import resolve_weights
    from ..models.registry import checkpoint_task
    from ..weights import read_checkpoint
    from ..weights.io import read_metadata

    path = resolve_weights(weights)
    if path.suffix == ".onnx":
        from ..export.onnx import onnx_session
        from ..export.onnx import read_metadata as read_onnx_metadata

        task = read_onnx_metadata(onnx_session(path)).get("task", "classification")
        return task if task in ("classification", "segmentation") else "classification"
    if path.suffix in (".pt2", ".pte", ".tflite"):
        return "classification"  # exported classifiers (detectors export raw heads)
    metadata = read_metadata(path)
    if metadata.get("task"):
        return metadata["task"]
    if metadata.get("format", "").startswith("mobilenet") and "config" not in metadata:
        return "classification"  # int8 classifiers
    return checkpoint_task(*read_checkpoint(path))


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    task = model_task(args.model)
    _check_flags(args, task, args.model)
    if args.optimizer is not None and args.lr is None:
        raise MobileNetError("--optimizer changes the recipe's optimizer: give --lr too")
    if task == "classification" and args.val_fraction is not None and args.val_data is None:
        from ..data.shards import is_shards

        if is_shards(args.data):
            raise MobileNetError(
                "--val-fraction cannot hold out part of tar shards: give the held-out shards "
                "with --val-data"
            )
    if task == "segmentation":
        from .segmentation import trained_line

        result, best = trained_line(args)
    elif task == "detection":
        from ..tasks.detection import train_detector
        from .detection import detection_config

        result = train_detector(detection_config(args))
        best = (
            f"mAP {result.best_map:.3f}, mAP@.5 {result.best_map_50:.3f} "
            f"(epoch {result.best_epoch})"
            if result.best_map is not None
            else "-"
        )
        best = f"best held-out {best}"
    else:
        from ..tasks.classification import train

        result = train(_classification_config(args))
        best = f"{result.best_top1:.2f}% (epoch {result.best_epoch})" if result.best_top1 else "-"
        best = f"best validation top-1 {best}"
    if is_main_process():
        print(
            f"done in {result.seconds:.0f} s: {best}\n"
            f"  weights  {result.out / 'best.safetensors'}\n"
            f"  curves   {result.out / 'curves.png'}\n"
            f"  metrics  {result.out / 'metrics.csv'}"
        )
    return 0


def _classification_config(args: argparse.Namespace):
    from ..tasks.classification import TrainConfig
    from ..train.recipes import get_recipe

    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "ema_decay": args.ema_decay,
    }
    return TrainConfig(
        **run_settings(args),
        recipe=get_recipe(args.recipe or "demo", **overrides),
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        lr=args.lr,
        channels_last=args.channels_last is not False,
        pretrained=args.pretrained,
    )


def _weights_task(args: argparse.Namespace) -> str:
    """The task of ``--weights`` (or ``--model``), with the other task's flags refused."""
    task = checkpoint_task_of(args.weights, args.model)
    _check_flags(args, task, args.model or args.weights)
    return task


def _classifier(args: argparse.Namespace, batch: int, what: str, device: str = "cpu"):
    """The trained classifier of ``--weights``, once it is known to fit in memory."""
    from ..inference import load_trained

    trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
    check_memory(trained.model, trained.resolution, batch, what, device=device)
    return apply_preprocess(args, trained, say=False)  # said once it has run


def cmd_eval(args: argparse.Namespace) -> int:
    task = _weights_task(args)
    if task == "segmentation":
        from .segmentation import eval_segmenter

        return eval_segmenter(args)
    if task == "detection":
        from .detection import eval_detector

        return eval_detector(args)
    from ..inference import evaluate_on

    trained = _classifier(args, args.batch_size or 64, "the evaluation", args.device or "cpu")
    metrics = evaluate_on(
        trained, args.data, args.batch_size or 64, args.workers or 0, args.device or "cpu"
    )
    say_preprocess(trained.preprocess)  # after the run: a refused one stays one error line
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{trained.model.config.name} on {args.data}: top-1 {metrics['top1']:.2f}%  "
            f"top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
            f"({metrics['images']} images at {trained.resolution}x{trained.resolution})"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    task = _weights_task(args)
    if task == "segmentation":
        from .segmentation import segment

        return segment(args)
    if task == "detection":
        from .detection import detect

        return detect(args)
    from ..inference import predict

    trained = _classifier(args, 1, "the prediction")
    results = predict(trained, args.images, args.top or 5, args.engine or "auto")
    say_preprocess(trained.preprocess)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        print(result["image"])
        for entry in result["top"]:
            print(f"  {entry['probability']:7.2%}  {entry['class']}")
    return 0
