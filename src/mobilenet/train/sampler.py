"""Repeated augmentation: each image several times per epoch, its copies on different processes.

Hoffer et al., "Augment your batch" (CVPR 2020), and DeiT (Touvron et al., 2021) train on
``K`` differently augmented copies of each image; DeiT's ``RASampler`` is what timm's
``--aug-repeats`` (``RepeatAugSampler``) and torchvision's classification reference
(``--ra-sampler``, ``RASampler``) use. Each epoch shuffles the indices, repeats each one
``K`` times in a row and deals the list out to the processes by striding, so with ``K``
or more processes the copies of an image land on ``K`` different ones (each process
augments its copy with its own randomness).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import MobileNetError

__all__ = ["RepeatedAugmentationSampler"]


class RepeatedAugmentationSampler(Sampler[int]):
    """DeiT's repeated-augmentation sampler for ``num_replicas`` processes.

    Epoch length: every process yields ``dataset_size // num_replicas`` samples, the
    length of a ``DistributedSampler(drop_last=True)`` shard, so an epoch still takes as
    many steps as one pass over the distinct images and the schedule (set in epochs) is
    unchanged; with ``K`` repeats an epoch sees about ``1 / K`` of the distinct images,
    ``K`` times each. DeiT's sampler, and timm's and torchvision's copies of it, take the
    same per-process count after first rounding the dataset down to a multiple of 256
    (``num_selected_samples = len(dataset) // 256 * 256 / num_replicas``; timm's
    ``selected_round=256``); here there is no rounding, so small datasets keep every step,
    and ``repeats=1`` gives exactly ``DistributedSampler(shuffle, seed, drop_last=True)``'s
    order.

    The order depends only on ``(seed, epoch)``, through a generator seeded with
    ``seed + epoch`` as ``DistributedSampler`` does: a resumed run draws the same one.
    """

    def __init__(
        self,
        dataset_size: int,
        num_replicas: int,
        rank: int,
        repeats: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if repeats < 1:
            raise MobileNetError(f"--aug-repeats {repeats}: each image must be used at least once")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise MobileNetError(f"rank {rank} is not one of {num_replicas} processes")
        if dataset_size < 0:
            raise MobileNetError(f"a dataset of {dataset_size} images")
        self.dataset_size = dataset_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.repeats = repeats
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def replica_indices(self) -> list[int]:
        """This process's whole share of the epoch's repeated list, before it is cut to
        ``len(self)``: every ``num_replicas``-th entry from ``rank``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator)
        else:
            order = torch.arange(self.dataset_size)
        repeated = order.repeat_interleave(self.repeats)  # [a, a, a, b, b, b, ...]
        return repeated[self.rank :: self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int]:
        # The share holds at least len(self) entries: dataset_size * repeats // num_replicas.
        return iter(self.replica_indices()[: len(self)])

    def __len__(self) -> int:
        return self.dataset_size // self.num_replicas
