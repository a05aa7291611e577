"""``mobilenet train|eval|predict|export|quantize`` for classifiers (found by :mod:`.tasks`).

``train`` runs a recipe (``--recipe``, its settings overridden by the flags given);
``eval`` prints top-1, top-5 and the loss; ``predict`` the most likely classes of each
image, run on the engine ``--engine`` names (``auto``: the one measured fastest here).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ..errors import MobileNetError
from ..formats import Format
from ..limits import check_memory
from .args import is_main_process, run_settings
from .preprocess import PREPROCESS_FLAGS, apply_preprocess, say_preprocess
from .tasks import EXPORT_CHECK, TaskCommands, check_num_classes

__all__ = ["COMMANDS", "ClassificationCommands", "classification_config"]


class ClassificationCommands(TaskCommands):
    name = "classification"
    flags: Mapping[str, str] = {
        "recipe": "--recipe",
        "val_fraction": "--val-fraction",
        "pretrained": "--pretrained",
        "channels_last": "--no-channels-last",
        "mixup": "--mixup",
        "cutmix": "--cutmix",
        "mix_prob": "--mix-prob",
        "switch_prob": "--switch-prob",
        "drop_path": "--drop-path",
        "aug_repeats": "--aug-repeats",
        "layer_decay": "--layer-decay",
        "teacher": "--teacher",
        "teacher_model": "--teacher-model",
        "kd_alpha": "--kd-alpha",
        "kd_temperature": "--kd-temperature",
        "kd_features": "--kd-features",
        "top": "--top",
        "engine": "--engine",
        **PREPROCESS_FLAGS,
    }
    quantizes = True
    square_input = (
        "a classifier's input is square: --resolution N (HxW applies to segmentation models)"
    )

    def train(self, args: argparse.Namespace) -> tuple[Any, str]:
        from ..classification.task import train
        from ..data.shards import is_shards

        if args.val_fraction is not None and args.val_data is None and is_shards(args.data):
            raise MobileNetError(
                "--val-fraction cannot hold out part of tar shards: give the held-out shards "
                "with --val-data"
            )
        config = classification_config(args)
        if args.recipe is not None and not args.quiet and is_main_process():
            print(describe_recipe(config.recipe, config.lr, args.grad_accum_steps), flush=True)
        result = train(config)
        best = f"{result.best_top1:.2f}% (epoch {result.best_epoch})" if result.best_top1 else "-"
        return result, f"best validation top-1 {best}"

    def evaluate(self, args: argparse.Namespace) -> int:
        from ..classification.predict import evaluate_on

        batch, device = args.batch_size or 64, args.device or "cpu"
        trained = _classifier(args, batch, "the evaluation", device)
        metrics = evaluate_on(trained, args.data, batch, args.workers or 0, device)
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

    def predict(self, args: argparse.Namespace) -> int:
        from ..classification.predict import predict

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

    def trained_for_export(self, args: argparse.Namespace, fmt: Format):
        """The trained model, its resolution and the card its file keeps (its class
        names, its preprocessing): the width and classes are the file's own, as for
        ``eval``; ``--width-mult`` overrides the width only when given (a torchvision/timm
        file)."""
        from ..classification.predict import load_trained
        from ..models.base import DeployedModel

        trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
        if isinstance(trained.model, DeployedModel):
            raise MobileNetError(f"{args.weights} is already exported: export the float weights")
        check_num_classes(args, trained.model.num_classes)
        check_memory(trained.model, trained.resolution, *EXPORT_CHECK)
        if fmt.keeps_metadata:  # kept in the file, said after it
            trained = apply_preprocess(args, trained, say=False)
        return trained.model, trained.resolution, trained.model_card()

    def random_for_export(self, args: argparse.Namespace, fmt: Format):
        """A randomly initialised classifier whose card keeps our preprocessing or the
        command line's."""
        from ..data.published import model_preprocess
        from ..deployed import Trained

        model, resolution, card = super().random_for_export(args, fmt)
        if fmt.keeps_metadata:
            trained = Trained(model, [], resolution, preprocess=model_preprocess(model, resolution))
            card = card.replace(preprocess=apply_preprocess(args, trained, say=False).preprocess)
        return model, resolution, card


def classification_config(args: argparse.Namespace):
    """The run ``mobilenet train`` asks for, as a :class:`TrainConfig`."""
    from ..classification.task import TrainConfig
    from ..train.recipes import get_recipe

    if args.teacher is None:
        for name in ("kd_alpha", "kd_temperature", "kd_features", "teacher_model"):
            if getattr(args, name) is not None:
                raise MobileNetError(f"--{name.replace('_', '-')} needs a --teacher")
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "ema_decay": args.ema_decay,
        **{name: getattr(args, name) for name in RECIPE_FLAGS},
    }
    return TrainConfig(
        **run_settings(args),
        recipe=get_recipe(args.recipe or "demo", model=args.model, **overrides),
        val_fraction=0.1 if args.val_fraction is None else args.val_fraction,
        lr=args.lr,
        channels_last=args.channels_last is not False,
        pretrained=args.pretrained,
        teacher=args.teacher,
        teacher_model=args.teacher_model,
        kd_features=args.kd_features or 0.0,
    )


def describe_recipe(recipe: Any, lr: float | None, accumulate: int) -> str:
    """The resolved recipe, one ``field value`` per line, as it will train."""
    from dataclasses import asdict

    effective = recipe.batch_size * accumulate
    rate = lr if lr is not None else recipe.scaled_lr(effective)
    lines = [
        f"recipe {recipe.name} (resolved; lr {rate:.4g} for an effective batch of {effective}):"
    ]
    for key, value in asdict(recipe).items():
        if key != "name":
            lines.append(f"  {key:<18} {value}")
    return "\n".join(lines)


# Flags that override the recipe field of their name.
RECIPE_FLAGS = (
    "mixup",
    "cutmix",
    "mix_prob",
    "switch_prob",
    "drop_path",
    "aug_repeats",
    "layer_decay",
    "kd_alpha",
    "kd_temperature",
)


def _classifier(args: argparse.Namespace, batch: int, what: str, device: str = "cpu"):
    """The trained classifier of ``--weights``, once it is known to fit in memory."""
    from ..classification.predict import load_trained

    trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
    check_memory(trained.model, trained.resolution, batch, what, device=device)
    return apply_preprocess(args, trained, say=False)  # said once it has run


COMMANDS = ClassificationCommands()
