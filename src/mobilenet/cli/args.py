"""Argument types and shared arguments of every command, defined once."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, NoReturn

from ..cost import MAX_RESOLUTION, MIN_RESOLUTION, check_resolution
from ..errors import MobileNetError
from ..models import list_models
from ..models.registry import check_width_mult

__all__ = [
    "Parser",
    "add_model_args",
    "dense_task_config",
    "finite_float",
    "is_main_process",
    "model_kwargs",
    "model_name",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "resolution",
    "resolution_hw",
    "seed",
    "width",
]

SEED_LIMIT = 2**32  # numpy's seeds are 32-bit; torch's wider, but a run seeds both


class Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def finite_float(text: str) -> float:
    """Any finite number. ``float()`` also reads ``nan`` and ``inf``, which no flag means:
    a NaN passes every comparison check downstream (``nan < 0`` is False) and poisons a
    whole run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def width(text: str) -> float:
    """The width multiplier alpha: any positive number up to ``MAX_WIDTH_MULT``."""
    value = positive_float(text)
    try:
        return check_width_mult(value)
    except MobileNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _integer(text: str, lowest: int, limit: int | None = None, bounds: str = "") -> int:
    """``text`` as an integer >= ``lowest`` (and < ``limit``); ``bounds`` words the range."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < lowest or (limit is not None and value >= limit):
        raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
    return value


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**32), the range every generator a run seeds
    (Python, NumPy, PyTorch) accepts."""
    return _integer(text, 0, SEED_LIMIT, ">= 0 and < 2**32")


def positive_int(text: str) -> int:
    return _integer(text, 1, bounds="> 0")


def non_negative_int(text: str) -> int:
    return _integer(text, 0, bounds=">= 0")


def resolution(text: str) -> int:
    try:
        return check_resolution(int(text))
    except MobileNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer >= 32 and <= {MAX_RESOLUTION}, got {text!r}"
        ) from None


def resolution_hw(text: str) -> int | tuple[int, int]:
    """An input size: a square's side (``512``) or ``HEIGHTxWIDTH`` (``1024x2048``, as
    Cityscapes), each side an integer from 32 (the output stride) to ``MAX_RESOLUTION``;
    the side as an integer, or the ``(height, width)`` pair as given. Sizes that fit these
    bounds but not the machine are refused by the commands that allocate
    (:func:`mobilenet.limits.check_memory`)."""
    bounds = f"an integer >= {MIN_RESOLUTION} and <= {MAX_RESOLUTION}"
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    parts = [p.strip() for p in text.strip().lower().split("x")]
    if len(parts) > 2 or not all(p.isascii() and p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(
            f"expected a size such as 512 or 1024x2048 (height x width), each side {bounds}, "
            f"got {shown}"
        )
    sides = [int(p) if len(p) <= 12 else MAX_RESOLUTION + 1 for p in parts]  # int() caps digits
    for side in sides:
        if not MIN_RESOLUTION <= side <= MAX_RESOLUTION:
            raise argparse.ArgumentTypeError(f"each side must be {bounds}, got {shown}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def model_name(task: str | tuple[str, ...] | None = None):
    """An argument type: a registered model of ``task`` (a task or several; None: of any
    task)."""
    tasks = task if isinstance(task, tuple) else (task,)

    def check(text: str) -> str:
        known = [name for t in tasks for name in list_models(task=t)]
        if text not in known:
            raise argparse.ArgumentTypeError(
                f"unknown model {text!r}; choose from: {', '.join(known)}"
            )
        return text

    check.__name__ = "model name"  # argparse names the type in its messages
    return check


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--width-mult`` and ``--num-classes``: the options every model builder takes.

    Both default to None, "not given": the builder's default (width 1.0) applies, and a
    checkpoint's own config is not overridden by a default nobody typed.
    """
    p.add_argument(
        "--width-mult", type=width, default=None, help="width multiplier alpha (default 1.0)"
    )
    p.add_argument("--num-classes", type=non_negative_int, default=None, help="model outputs")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The builder options given on the command line (see :func:`add_model_args`)."""
    kwargs: dict[str, Any] = {}
    if getattr(args, "width_mult", None) is not None:
        kwargs["width_mult"] = args.width_mult
    if getattr(args, "num_classes", None) is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def is_main_process() -> bool:
    """False in the other processes of a torchrun group (only rank 0 prints results)."""
    return int(os.environ.get("RANK", "0")) == 0


# The training flags detection and segmentation share (None: the config's default).
DENSE_FLAGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "ema_decay",
    "flip",
)


def dense_task_config(config_class: type, args: argparse.Namespace, **given: Any) -> Any:
    """A detection or segmentation training config (``config_class``) of ``mobilenet
    train``'s arguments: the settings every run has, the shared flags and the task's own
    ``given``, each given flag overriding the config's default."""
    flags = {name: getattr(args, name) for name in DENSE_FLAGS}
    given = {k: v for k, v in {**flags, **given}.items() if v is not None}
    return config_class(**run_settings(args), **given)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of every ``mobilenet train`` run, whatever its task's config."""
    return {
        "model": args.model,
        "data": args.data,
        "out": Path(args.out),
        "width_mult": args.width_mult,
        "val_data": args.val_data,
        "eval_every": args.eval_every,
        "seed": args.seed,
        "workers": args.workers,
        "device": args.device,
        "amp": args.amp,
        "resume": args.resume,
        "progress": not args.quiet,
        "grad_accum_steps": args.grad_accum_steps,
        "compile": args.compile,
    }
