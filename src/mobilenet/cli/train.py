"""``mobilenet train``, ``eval``, ``predict``: one command for every task.

The model's registered task (or, for ``eval`` and ``predict``, the checkpoint's) decides
what runs: the commands hand over to that task's :class:`~.tasks.TaskCommands`. A flag
that only another task uses is refused rather than ignored. ``mobilenet detect
train|eval|predict`` is the same commands with a detector by default.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..card import TASKS, ModelCard
from ..errors import MobileNetError
from ..formats import format_of, formats
from ..models import model_task
from .args import (
    finite_float,
    is_main_process,
    model_name,
    non_negative_int,
    positive_float,
    positive_int,
    resolution,
    seed,
    width,
)
from .preprocess import add_preprocess_args
from .tasks import flag_owners, task_named

__all__ = ["add_detect_alias", "add_parsers", "checkpoint_task_of", "saved_settings"]


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
    p.add_argument(
        "--resolution",
        "--image-size",
        dest="resolution",
        type=resolution,
        help="input size (default: the recipe's; detection: 320)",
    )
    p.add_argument("--eval-every", type=positive_int, default=1, help="epochs between evals")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    _add_classification(p)
    _add_engine(p)
    _add_distillation(p)
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
    s.add_argument(
        "--aux-loss",
        action="store_true",
        default=None,
        help="train DeepLabv3's auxiliary head too (loss + 0.5 x its loss)",
    )
    s.add_argument(
        "--num-classes",
        type=positive_int,
        default=None,
        help="the classes of masks without a classes.txt (needed for 16-bit "
        "masks; default: the largest value of 8-bit masks + 1)",
    )


def _add_classification(p: argparse.ArgumentParser) -> None:
    """A classifier's flags: its recipe, data split, start and regularisers."""
    from ..train.recipes import RECIPES

    c = p.add_argument_group("classification")
    c.add_argument(
        "--recipe",
        help=f"one of: {', '.join(RECIPES)} (default: demo); printed as resolved before training",
    )
    c.add_argument("--val-fraction", type=finite_float, help="share of --data held out (0.1)")
    c.add_argument("--pretrained", help="start from these weights (classifier reset)")
    c.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    _add_regularisation(c)


def _add_engine(p: argparse.ArgumentParser) -> None:
    """How every task's steps run."""
    p.add_argument(
        "--grad-accum-steps",
        type=positive_int,
        default=1,
        help="sum the gradients of N batches per optimizer step: an effective batch of "
        "N x --batch-size (its learning rate, schedule and EMA follow it)",
    )
    p.add_argument("--compile", action="store_true", help="the training step via torch.compile")


def _add_distillation(p: argparse.ArgumentParser) -> None:
    """A teacher for a classifier."""
    k = p.add_argument_group("distillation (classification)")
    k.add_argument(
        "--teacher",
        help="distil from this classifier: any file eval reads (ours, torchvision/timm/Keras "
        "weights with --teacher-model, .onnx, .pt2)",
    )
    k.add_argument("--teacher-model", type=model_name("classification"), help="its architecture")
    k.add_argument("--kd-alpha", type=finite_float, help="share of the distillation loss (0.5)")
    k.add_argument("--kd-temperature", type=finite_float, help="softmax temperature (1)")
    k.add_argument(
        "--kd-features",
        type=finite_float,
        help="weight of feature distillation: the student's last map, through a learned "
        "1x1 projection, against the teacher's (MSE; default 0: logits only)",
    )


def _add_regularisation(c: argparse._ArgumentGroup) -> None:
    """The recipe's regularisers, each overriding the recipe's value."""
    c.add_argument("--mixup", type=finite_float, help="MixUp's Beta alpha (0: off)")
    c.add_argument("--cutmix", type=finite_float, help="CutMix's Beta alpha (0: off)")
    c.add_argument("--mix-prob", type=finite_float, help="share of batches mixed (1)")
    c.add_argument("--switch-prob", type=finite_float, help="with both: CutMix's share (0.5)")
    c.add_argument(
        "--drop-path",
        type=finite_float,
        help="stochastic depth of the last residual block, less before it (0: off)",
    )
    c.add_argument(
        "--aug-repeats", type=positive_int, help="repeated augmentation: each image K times"
    )
    c.add_argument(
        "--layer-decay",
        type=finite_float,
        help="layer-wise lr decay for fine-tuning: each layer down x this factor",
    )


def _weights_help() -> str:
    """What eval and predict read: weights, or a file of any format that loads."""
    read = [f"{name} ({f.suffix})" for name, f in formats().items() if f.loads]
    return "best.safetensors or any checkpoint, or a file export or quantize wrote: " + (
        ", ".join(read)
    )


def _add_eval(sub: argparse._SubParsersAction, task: str | None) -> None:
    p = sub.add_parser(
        "eval", help="top-1/top-5 of a classifier, COCO mAP of a detector, mIoU of a segmenter"
    )
    p.set_defaults(func=cmd_eval, task=task)
    p.add_argument("--weights", required=True, help=_weights_help())
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
    from ..classification.predict import predict_engines

    p = sub.add_parser(
        "predict", help="classify images, detect the objects in them or segment them"
    )
    p.set_defaults(func=cmd_predict, task=task)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--weights", required=True, help=_weights_help())
    p.add_argument("--model", type=model_name(task), help="for torchvision/timm checkpoints")
    p.add_argument("--json", action="store_true", help="print JSON")
    c = p.add_argument_group("classification")
    c.add_argument("--width-mult", type=width, default=None, help="width multiplier alpha")
    c.add_argument("--resolution", type=resolution, default=None, help="input size")
    c.add_argument("--top", type=positive_int, default=None, help="classes per image (5)")
    c.add_argument(
        "--engine",
        choices=predict_engines(),
        default=None,
        help="auto (default: the fastest float engine that bench --save measured on this "
        "machine, else ONNX Runtime where installed); an exported file runs on its own",
    )
    d = p.add_argument_group("detection")
    d.add_argument("--min-score", type=finite_float, default=None, help="report above (0.5)")
    d.add_argument(
        "--out",
        dest="draw",
        help="folder for the images with their boxes drawn "
        "(segmentation: for the masks and overlays)",
    )
    add_preprocess_args(p)


# --------------------------------------------------------------------------- which task


def _check_flags(args: argparse.Namespace, task: str, what: str) -> None:
    """Refuse a flag of another task: it would be ignored."""
    if args.task is not None and task != args.task:
        raise MobileNetError(f"{what} is a {task} model; `mobilenet detect` takes detectors")
    for dest, (flag, owners) in flag_owners().items():
        if task not in owners and getattr(args, dest, None) is not None:
            owned = " and ".join(owners)
            raise MobileNetError(f"{flag} applies to {owned} models; {what} is a {task} model")
    if task_named(task).keeps_settings and args.func is not cmd_train:
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

    exported = format_of(path)
    if exported is not None:  # an exported file keeps its config as ours do
        metadata = {"format": FORMAT, **exported.metadata(path)}
    else:
        metadata = read_metadata(path)
    try:
        config = saved_config(metadata)
        size = ModelCard.read(metadata, str(path)).input_size
    except MobileNetError:  # the loader names the damage, with the file
        return None, None
    if config is not None and isinstance(config.get("image_size"), int):
        size = (config["image_size"],) * 2  # a detector's: its default boxes' layout
    return config, size


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
    exported = format_of(path)
    if exported is not None:
        return exported.task_of(path)
    metadata = read_metadata(path)
    task = metadata.get("task")
    if task:  # one this mobilenet does not know is refused by the card's reader, in one line
        return task if task in TASKS else "classification"
    if metadata.get("format", "").startswith("mobilenet") and "config" not in metadata:
        return "classification"  # int8 classifiers
    return checkpoint_task(*read_checkpoint(path))


# --------------------------------------------------------------------------- commands


def cmd_train(args: argparse.Namespace) -> int:
    task = model_task(args.model)
    _check_flags(args, task, args.model)
    if args.optimizer is not None and args.lr is None:
        raise MobileNetError("--optimizer changes the recipe's optimizer: give --lr too")
    result, best = task_named(task).train(args)
    if is_main_process():
        print(
            f"done in {result.seconds:.0f} s: {best}\n"
            f"  weights  {result.out / 'best.safetensors'}\n"
            f"  curves   {result.out / 'curves.png'}\n"
            f"  metrics  {result.out / 'metrics.csv'}"
        )
    return 0


def _weights_task(args: argparse.Namespace) -> str:
    """The task of ``--weights`` (or ``--model``), with the other task's flags refused."""
    task = checkpoint_task_of(args.weights, args.model)
    _check_flags(args, task, args.model or args.weights)
    return task


def cmd_eval(args: argparse.Namespace) -> int:
    return task_named(_weights_task(args)).evaluate(args)


def cmd_predict(args: argparse.Namespace) -> int:
    return task_named(_weights_task(args)).predict(args)
