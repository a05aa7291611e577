"""Evaluation: loss, top-1 and top-5 over a dataset, sharded across processes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import MobileNetError
from .distributed import Distributed

__all__ = ["ShardSampler", "evaluate", "finite_outputs", "require_finite"]


def require_finite(outputs: Any, source: str) -> None:
    """Refuse NaN or infinite model outputs (a tensor, or a dict, list or tuple of them),
    naming ``source``, the weights file. A softmax of them is NaN for every class and an
    argmax picks class 0: a score or a prediction made of them looks like a result but
    is none. One reduction per batch: cheap beside the model."""
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    tensors = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(t.isfinite().all()):
            raise MobileNetError(
                f"{source}: the model outputs NaN or infinite values (damaged or overflowing "
                "weights); no result"
            )


@contextmanager
def finite_outputs(modules: Iterable[nn.Module], source: str) -> Iterator[None]:
    """Within the block, every output of ``modules`` is checked by :func:`require_finite`
    (for models whose own forward turns the outputs into something else: a detector's
    logits into boxes above a score, where NaN scores would leave no box at all)."""
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: require_finite(out, source)) for m in modules
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


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
    source: str | None = None,
) -> dict[str, float]:
    """``{"loss", "top1", "top5", "images"}`` over the whole dataset (all ranks).

    With ``source`` (the weights file of ``mobilenet eval``), NaN or infinite logits are
    an error naming it; without (during training, whose engine stops on a NaN loss), the
    scores say what they are."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=dist.device)  # loss, top1, top5, n
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, targets in loader:
        images = images.to(dist.device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(dist.device, non_blocking=True)
        with torch.autocast(dist.device.type, enabled=amp):
            logits = model(images)
        logits = logits.float()
        if source is not None:
            require_finite(logits, source)
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
