"""The model and everything that trains it (optimizer, schedule, GradScaler, EMA, the
best score so far): what ``last.pt`` saves and ``--resume`` restores."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..errors import MobileNetError
from . import checkpoint as ckpt
from .distributed import Distributed
from .optim import build_ema, build_optimizer, build_scheduler
from .recipes import Recipe

__all__ = ["State"]


class State:
    """The model and everything that trains it: what ``last.pt`` saves and restores."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        lr: float | None,
        amp: bool,
        channels_last: bool,
        dist: Distributed,
        steps: int,
        accumulate: int = 1,
        compiled: bool = False,
    ) -> None:
        """``lr``: the absolute rate (None: the recipe's, scaled to the effective batch,
        ``accumulate`` x its batch size); ``steps``: optimizer steps per epoch, for the
        schedule; ``compiled``: train through ``torch.compile`` of the model."""
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(dist.device, memory_format=memory_format)
        self.lr = lr if lr is not None else recipe.scaled_lr(recipe.batch_size * accumulate)
        self.optimizer = build_optimizer(model, recipe, self.lr)
        self.scheduler = build_scheduler(self.optimizer, recipe, recipe.epochs, steps)
        self.ema = build_ema(model, recipe.ema_decay)
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=amp)
        cuda = dist.device.type == "cuda"
        self.ddp: nn.Module = (
            DistributedDataParallel(model, device_ids=[dist.device] if cuda else None)
            if dist.enabled
            else model
        )
        # What the training step runs: the (distributed) model, compiled or not. The
        # model itself stays as it is: its state dict, EMA and evaluation are eager.
        self.forward: nn.Module = torch.compile(self.ddp) if compiled else self.ddp  # type: ignore[assignment]
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_val: dict[str, float] | None = None

    @property
    def evaluated(self) -> nn.Module:
        """The network that is evaluated and saved: the EMA of the weights, if kept."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, loss: torch.Tensor) -> float:
        """One optimizer step on one batch's loss; returns the learning rate it used."""
        self.backward(loss)
        return self.update()

    def backward(self, loss: torch.Tensor) -> None:
        """Add ``loss``'s gradients to those of the batches since the last update (a
        share of an accumulated batch's loss: its mean over the micro-batch / steps)."""
        self.scaler.scale(loss).backward()

    def sync(self, last: bool):
        """DistributedDataParallel averages gradients on the last micro-batch of an
        accumulated step only (``no_sync`` before it): one all-reduce per update."""
        if last or not isinstance(self.ddp, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def update(self) -> float:
        """The optimizer step on the gradients gathered since the last one, then the
        schedule and the EMA; returns the (peak) learning rate it used."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        with warnings.catch_warnings():
            # Under --amp the scaler skips a step whose gradients overflowed (the first ones,
            # while it finds its scale); the schedule advances all the same, as in torchvision's
            # and timm's references, so PyTorch's "scheduler before optimizer" note is noise.
            if self.scaler.is_enabled():
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return lr

    def checkpoint(self, epoch: int, settings: dict[str, Any]) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": ckpt.rng_state(),
            "history": self.history,
            "best": {"score": self.best_score, "epoch": self.best_epoch, "val": self.best_val},
            "config": settings,  # compared on --resume
        }

    def restore(self, saved: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(saved["ema"])
            ckpt.set_rng_state(saved["rng"])
            self.epoch, self.history, best = saved["epoch"], saved["history"], saved["best"]
        except (KeyError, TypeError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MobileNetError(
                f"last.pt does not fit this run (another model or settings?): {first}"
            ) from None
        self.best_score, self.best_epoch, self.best_val = best["score"], best["epoch"], best["val"]
        # The schedule is a function of the step and the number of epochs: recompute the
        # rate of the step reached (the same value when the epochs are unchanged; on the
        # longer curve when --epochs grew).
        s = self.scheduler
        for group, base, factor in zip(
            self.optimizer.param_groups, s.base_lrs, s.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(s.last_epoch)
