"""The preprocessing flags of ``eval``, ``predict`` and ``export``: a checkpoint's own
settings by default (see :mod:`mobilenet.data.published`), a known one by name, or
single settings changed; the one used is said in one line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ..errors import MobileNetError
from .args import finite_float, positive_float, positive_int

__all__ = [
    "PREPROCESS_FLAGS",
    "add_preprocess_args",
    "apply_preprocess",
    "preprocess_of",
    "say_preprocess",
]

# dest -> flag: a classifier's (.classification), refused for the other tasks' models,
# which would ignore them.
PREPROCESS_FLAGS = {
    "preprocess": "--preprocess",
    "mean": "--mean",
    "std": "--std",
    "crop_pct": "--crop-pct",
    "resize": "--resize",
    "interpolation": "--interpolation",
}


def known_name(text: str) -> str:
    """An argument type: the name of a known preprocessing."""
    from ..data.published import KNOWN

    if text not in KNOWN:
        raise argparse.ArgumentTypeError(
            f"unknown preprocessing {text!r}; known: {', '.join(KNOWN)}"
        )
    return text


def crop_fraction(text: str) -> float:
    """An argument type: a crop's share of the resized image, in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    from ..data.preprocess import INTERPOLATIONS

    g = p.add_argument_group(
        "preprocessing (default: the checkpoint's own; see docs/preprocessing.md)"
    )
    g.add_argument(
        "--preprocess",
        type=known_name,
        default=None,
        metavar="NAME",
        help="a known one: mobilenet_v2.tv2_in1k, mobilenetv3_large_100.ra_in1k, "
        "keras, imagenet, ...",
    )
    g.add_argument(
        "--mean",
        type=finite_float,
        nargs=3,
        default=None,
        metavar=("R", "G", "B"),
        help="per channel, on pixels in [0, 1]",
    )
    g.add_argument("--std", type=positive_float, nargs=3, default=None, metavar=("R", "G", "B"))
    g.add_argument(
        "--crop-pct",
        type=crop_fraction,
        default=None,
        help="shorter side: floor(resolution / crop-pct) (timm)",
    )
    g.add_argument(
        "--resize",
        type=positive_int,
        default=None,
        help="resize the shorter side to this (torchvision's resize_size)",
    )
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default=None)


def preprocess_of(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a :class:`~mobilenet.data.preprocess.Preprocess`), or the one named by
    ``--preprocess`` at ``base``'s size, with the settings given on the command line."""
    from ..data.published import known

    if args.crop_pct is not None and args.resize is not None:
        raise MobileNetError("--crop-pct and --resize both set the size before the crop: give one")
    chosen = known(args.preprocess).at(base.resolution) if args.preprocess else base
    given = {
        key: tuple(value) if isinstance(value, list) else value
        for key in ("mean", "std", "crop_pct", "resize", "interpolation")
        if (value := getattr(args, key)) is not None
    }
    if not given:
        return chosen
    flags = " ".join(f"--{k.replace('_', '-')}" for k in given)
    return replace(chosen.replace(**given), name=f"{chosen.name} with {flags}")


def apply_preprocess(args: argparse.Namespace, trained: Any, say: bool = True) -> Any:
    """``trained`` with the preprocessing of the command line; says which in one line
    (on stderr: stdout keeps the results, JSON included) unless ``say`` is False."""
    trained.preprocess = preprocess_of(args, trained.eval_preprocess())
    if say:
        say_preprocess(trained.preprocess)
    return trained


def say_preprocess(preprocess: Any) -> None:
    """The one line that names the preprocessing a command used, on stderr."""
    print(f"preprocess {preprocess.describe()}", file=sys.stderr, flush=True)
