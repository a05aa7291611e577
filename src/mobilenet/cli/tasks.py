"""The tasks as the command line sees them: one :class:`TaskCommands` per task, found by
its name.

``train``, ``eval``, ``predict``, ``export`` and ``quantize`` learn the task from the
model (``--model``, else the file's card) and hand the command to its task's commands:
what it trains, how it scores and predicts, what it exports, which flags are its own.
Each task's commands live in a module of this package named for the task
(:mod:`.classification`, :mod:`.detection`, :mod:`.segmentation`), imported the first time
they are asked for; adding a task is adding its name to
:data:`mobilenet.card.TASKS`, its package and that module.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from ..card import TASKS, ModelCard
from ..errors import MobileNetError
from ..formats import Format

__all__ = [
    "EXPORT_CHECK",
    "TaskCommands",
    "check_num_classes",
    "flag_owners",
    "task_named",
    "tasks",
]

# The export runs the model on batches of 1 and 3 to check the exported file against it.
EXPORT_CHECK = (3, "the export")


class TaskCommands:
    """What the commands do for one task. Subclasses set the attributes and override
    what the task has; what it does not is refused in one line by the defaults."""

    name: str = ""
    # The flags (argparse dest -> flag) that only this task's models take (several
    # tasks may list one): given for another task's model, they are refused.
    flags: Mapping[str, str] = {}
    # eval and predict: its files keep their width and input size, which --width-mult and
    # --resolution may repeat, not change (a classifier's loader takes them itself).
    keeps_settings: bool = False
    quantizes: bool = False  # quantize takes its models
    # export: why --resolution HxW is refused (None: it is taken)
    square_input: str | None = None

    def train(self, args: argparse.Namespace) -> tuple[Any, str]:
        """Train as ``args`` say; the result (``seconds``, ``out``) and its best score in
        words, for the summary."""
        raise MobileNetError(self.refusal("train", args))

    def evaluate(self, args: argparse.Namespace) -> int:
        """``mobilenet eval``: score ``--weights`` on ``--data`` and print it."""
        raise MobileNetError(self.refusal("eval", args))

    def predict(self, args: argparse.Namespace) -> int:
        """``mobilenet predict``: run ``--weights`` on the images and print what it found."""
        raise MobileNetError(self.refusal("predict", args))

    def refusal(self, command: str, args: argparse.Namespace) -> str:
        """The one line for a ``command`` (train, eval, predict) this task's models do not
        take."""
        said = {
            "train": "are not trained by",
            "eval": "are not evaluated by",
            "predict": "do not predict in",
        }
        return f"{self.name} models {said[command]} this mobilenet"

    def export(self, args: argparse.Namespace, fmt: Format) -> int:
        """``mobilenet export``: write the model as ``fmt`` (the model of ``--weights``, or
        one randomly initialised for checking a deployment path), checked by the format
        against PyTorch."""
        from ..export.onnx import input_size
        from .preprocess import say_preprocess

        if args.weights:
            model, resolution, card = self.trained_for_export(args, fmt)
        else:
            model, resolution, card = self.random_for_export(args, fmt)
        options = {"opset": args.opset, "max_batch": args.max_batch}
        exported = fmt.export(model, Path(args.out), resolution, card, **options)
        size = "x".join(map(str, input_size(resolution)))
        print(
            f"wrote {args.out}: {model.config.name} at {size}, {exported.batch}; "
            f"{exported.checked_by} vs PyTorch max abs difference {exported.diff:.2e}"
        )
        if fmt.keeps_metadata and card.preprocess is not None:  # after the write: a refused
            say_preprocess(card.preprocess)  # export stays one error line
        return 0

    def trained_for_quantize(self, args: argparse.Namespace) -> Any:
        """``mobilenet quantize``: the float model of ``--weights`` (a
        :class:`~mobilenet.deployed.Trained`) for a task that ``quantizes``; by default a
        classifier's, with its classes and input size."""
        from ..classification.predict import load_trained
        from ..models.base import DeployedModel

        trained = load_trained(args.weights, args.model)
        if isinstance(trained.model, DeployedModel):
            raise MobileNetError(f"{args.weights} is already exported: quantize the float weights")
        return trained

    def trained_for_export(
        self, args: argparse.Namespace, fmt: Format
    ) -> tuple[Any, Any, ModelCard]:
        """The model of ``--weights``, its input size and the card its file keeps."""
        raise MobileNetError(f"{self.name} models are not exported by this mobilenet")

    def random_for_export(
        self, args: argparse.Namespace, fmt: Format
    ) -> tuple[Any, Any, ModelCard]:
        """A randomly initialised ``--model`` (for checking a deployment path, not for
        use), its input size and its card."""
        from ..export.onnx import input_size
        from ..limits import check_memory, meta_model
        from ..models import create_model
        from .args import model_kwargs

        resolution = args.resolution or 224
        # Checked on the meta device, before a byte is allocated.
        check_memory(meta_model(args.model, **model_kwargs(args)), resolution, *EXPORT_CHECK)
        model = create_model(args.model, **model_kwargs(args))
        config = model.config.to_dict()
        card = ModelCard(config=config, task=self.name, input_size=input_size(resolution))
        return model, resolution, card


@cache
def tasks() -> dict[str, TaskCommands]:
    """Every task's commands, by name, in :data:`~mobilenet.card.TASKS` order."""
    found = {}
    for name in TASKS:
        commands = importlib.import_module(f"{__package__}.{name}").COMMANDS
        if commands.name != name:
            raise RuntimeError(f"the commands of {name} say they are {commands.name}'s")
        found[name] = commands
    return found


def task_named(name: str) -> TaskCommands:
    known = tasks()
    if name not in known:
        raise MobileNetError(f"unknown task {name!r}; choose from {', '.join(known)}")
    return known[name]


@cache
def flag_owners() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every task's own flags: dest -> (flag, the tasks that take it)."""
    owners: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, commands in tasks().items():
        for dest, flag in commands.flags.items():
            owners[dest] = (flag, (*owners.get(dest, (flag, ()))[1], name))
    return owners


def check_num_classes(args: argparse.Namespace, count: int) -> None:
    """``--num-classes`` with ``--weights`` may repeat the file's count, not change it."""
    if args.num_classes is not None and args.num_classes != count:
        raise MobileNetError(
            f"--num-classes {args.num_classes} contradicts {args.weights}, which holds "
            f"{count} classes"
        )
