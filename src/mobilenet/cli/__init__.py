"""The ``mobilenet`` command line: one module per command group.

* :mod:`.models`: ``list``, ``cost``, ``convert``;
* :mod:`.train`: ``train``, ``eval``, ``predict`` for every task (the model decides), and
  ``detect train|eval|predict``, the same commands with a detector by default;
* :mod:`.deploy`: ``export``, ``bench`` and the parsers of :mod:`.quantize`;
* :mod:`.tasks`: what those commands do for each task, found by the task's name: the
  task's own module here (:mod:`.classification`, :mod:`.detection`,
  :mod:`.segmentation`);
* :mod:`.experiments`: ``memory``, ``experiment``;
* :mod:`.args`: the argument types and shared arguments, defined once.

Every error a user can cause is a :class:`~mobilenet.MobileNetError`, printed as one line
with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from functools import partial

from .. import __version__
from ..errors import MobileNetError
from . import data, deploy, experiments, models, train
from .args import Parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mobilenet",
        description="The MobileNet family (V1 to V4), as the papers describe it.",
    )
    parser.add_argument("--version", action="version", version=f"mobilenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models.add_parsers(sub)
    train.add_parsers(sub)
    train.add_detect_alias(sub)
    deploy.add_parsers(sub)
    experiments.add_parsers(sub)
    data.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # A warning is one line too, not Python's file:line and source line.
            warnings.showwarning = partial(_show_warning, args.command)
            return args.func(args) or 0
    except MobileNetError as e:
        print(f"mobilenet {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mobilenet cost --all --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _one_line(e: MobileNetError) -> str:
    """The error's own line. One raised in a DataLoader worker reaches this process as
    ``Caught MobileNetError in DataLoader worker process 0.`` and the worker's traceback,
    the original message on its last line."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.partition(": ")[2] or last
    return text


def _show_warning(command: str, message, category, filename, lineno, file=None, line=None):
    print(f"mobilenet {command}: warning: {message}", file=file or sys.stderr, flush=True)
