"""Argument types and shared arguments of every command, defined once."""

from __future__ import annotations

import argparse
import os
from typing import Any, NoReturn

from ..cost import check_resolution
from ..errors import MobileNetError
from ..models import list_models

__all__ = [
    "Parser",
    "add_model_args",
    "is_main_process",
    "model_kwargs",
    "model_name",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "resolution",
    "width",
]


class Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


width = positive_float  # the width multiplier alpha: any positive number


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def resolution(text: str) -> int:
    try:
        return check_resolution(int(text))
    except MobileNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 32, got {text!r}") from None


def model_name(task: str | None = None):
    """An argument type: a registered model of ``task`` (None: of any task)."""

    def check(text: str) -> str:
        known = list_models(task=task)
        if text not in known:
            raise argparse.ArgumentTypeError(
                f"unknown model {text!r}; choose from: {', '.join(known)}"
            )
        return text

    check.__name__ = "model name"  # argparse names the type in its messages
    return check


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--width-mult`` and ``--num-classes``: the options every model builder takes."""
    p.add_argument("--width-mult", type=width, default=1.0, help="width multiplier alpha")
    p.add_argument("--num-classes", type=non_negative_int, default=None, help="model outputs")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The builder options given on the command line (see :func:`add_model_args`)."""
    kwargs: dict[str, Any] = {"width_mult": args.width_mult}
    if getattr(args, "num_classes", None) is not None:
        kwargs["num_classes"] = args.num_classes
    return kwargs


def is_main_process() -> bool:
    """False in the other processes of a torchrun group (only rank 0 prints results)."""
    return int(os.environ.get("RANK", "0")) == 0
