"""The data sets a run reads from tar shards: a training stream with its held-out set
(shards or an image folder), and shards to evaluate on (see :mod:`.shards`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from .datasets import ImageFolder, Split
from .shards import ShardImages, ShardStream, is_shards, list_shards

__all__ = ["eval_set", "shard_splits"]

Transform = Callable[[object], torch.Tensor]


def eval_set(
    data: str, transform: Transform | None = None, classes: Sequence[str] | None = None
) -> ShardImages:
    """Shards for evaluation (``mobilenet eval --data``, ``--val-data``)."""
    return ShardImages(list_shards(data), transform, classes)


def shard_splits(
    data: str,
    val_data: str | None,
    train_transform: Transform,
    eval_transform: Transform,
    seed: int = 0,
    batch_size: int = 1,
) -> Split:
    """Training shards (streamed), with held-out shards or an image folder, or none.

    ``batch_size`` is the global batch: the workers split each process's part in whole
    batches of ``batch_size // world_size``, so the number of steps is exact.
    """
    train = ShardStream(list_shards(data), train_transform, seed=seed, batch_size=batch_size)
    if val_data is None:
        return Split(train, None, train.classes)
    val: Dataset
    if is_shards(val_data):
        val = eval_set(val_data, eval_transform, train.classes)
    else:
        val = ImageFolder(val_data, eval_transform, classes=train.classes)
    return Split(train, val, train.classes)
