"""Evaluation: loss, top-1 and top-5 over a dataset, sharded across processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .distributed import Distributed

__all__ = ["ShardSampler", "evaluate"]


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``: each image once, no padding."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    dist: Distributed,
    channels_last: bool = True,
    amp: bool = False,
) -> dict[str, float]:
    """``{"loss", "top1", "top5", "images"}`` over the whole dataset (all ranks)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss, top1, top5, n
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, targets in loader:
        images = images.to(dist.device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(dist.device, non_blocking=True)
        with torch.autocast(dist.device.type, enabled=amp):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        totals += torch.stack(
            [
                F.cross_entropy(logits, targets, reduction="sum").double(),
                hits[:, :1].sum().double(),
                hits.sum().double(),
                torch.tensor(len(targets), dtype=torch.float64, device=dist.device),
            ]
        )
    dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}
