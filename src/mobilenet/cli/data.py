"""``mobilenet shards``: an image folder written as WebDataset tar shards, for clusters.

The writer is :mod:`mobilenet.data.shard_writer`, the readers :mod:`mobilenet.data.shards`;
both are imported when the command runs, not when the command line starts.
"""

from __future__ import annotations

import argparse

from .args import non_negative_int, positive_int, seed

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shards",
        help="write an image folder as WebDataset tar shards",
        description="Write SRC (one sub-folder per class) as DST/PREFIX-000000.tar, ... with "
        "the class list in DST/classes.json; images that do not decode are skipped. Train "
        "on them with --data 'DST/train-{000000..000009}.tar' (or --data DST); a separate "
        "validation folder becomes --val-data shards written with --prefix val into "
        "another folder.",
    )
    p.set_defaults(func=cmd_shards)
    p.add_argument("src", help="image folder: SRC/<class>/<image>")
    p.add_argument("dst", help="folder for the shards and classes.json")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="images per shard")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    p.add_argument("--seed", type=seed, default=0, help="the (shuffled) order images are written")
    p.add_argument("--overwrite", action="store_true", help="replace PREFIX shards in DST")
    p.add_argument("--workers", type=non_negative_int, default=4, help="threads reading images")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_shards(args: argparse.Namespace) -> int:
    from ..data.shard_writer import write_shards
    from ..data.shards import CLASSES_FILE

    written = write_shards(
        args.src,
        args.dst,
        shard_size=args.shard_size,
        prefix=args.prefix,
        seed=args.seed,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.quiet,
    )
    skipped = f", {written.skipped} unreadable file(s) skipped" if written.skipped else ""
    print(
        f"wrote {written.samples} images of {len(written.classes)} classes in "
        f"{len(written.shards)} shard(s){skipped}\n"
        f"  shards   {written.pattern}\n"
        f"  classes  {written.shards[0].parent / CLASSES_FILE}\n"
        f'  train    mobilenet train --data "{written.pattern}" ...'
    )
    return 0
