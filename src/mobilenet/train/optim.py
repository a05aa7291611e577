"""Optimizers, parameter groups, learning-rate schedules and the weight EMA."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel

from ..errors import MobileNetError
from .recipes import Recipe

__all__ = [
    "RMSpropTF",
    "WeightEMA",
    "build_ema",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_groups",
    "warmup_cosine",
]


class RMSpropTF(Optimizer):
    """RMSProp as TensorFlow computes it, the optimizer of the MobileNet papers.

    For each parameter ``p`` with gradient ``g`` (weight decay ``wd`` is an L2 term, added
    to the gradient as TF adds it to the loss)::

        g    = g + wd * p
        ms   = decay * ms + (1 - decay) * g**2          # ms starts at 1, not 0
        mom  = momentum * mom + lr * g / sqrt(ms + eps) # eps inside the square root
        p    = p - mom

    It differs from ``torch.optim.RMSprop`` in three ways that matter for the papers'
    hyper-parameters: the mean square starts at one, epsilon sits inside the square root,
    and the learning rate enters the momentum buffer (so a learning-rate change acts
    gradually).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 0.01,
        decay: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not 0 <= decay < 1 or momentum < 0 or eps < 0 or weight_decay < 0:
            raise MobileNetError("invalid RMSpropTF hyper-parameters")
        defaults = dict(lr=lr, decay=decay, momentum=momentum, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, decay, momentum = group["lr"], group["decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                square_avg = state["square_avg"]
                square_avg.mul_(decay).addcmul_(grad, grad, value=1 - decay)
                update = grad / square_avg.add(group["eps"]).sqrt_()
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(update, alpha=lr)
                p.sub_(buf)
        return loss


def param_groups(
    model: nn.Module,
    weight_decay: float,
    norm_weight_decay: bool,
    layer_decay: float | None = None,
) -> list[dict]:
    """Split parameters so BatchNorm weights and biases can go without weight decay, and,
    with ``layer_decay`` d, into layers whose learning rate is the peak times
    ``d ** (depth from the top)`` (:func:`layer_depths`). A group's ``lr_scale`` is that
    factor; :func:`build_optimizer` turns it into the group's rate."""
    depths = layer_depths(model) if layer_decay is not None else {}
    groups: dict[tuple[int, bool], dict] = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm)
            decays = norm_weight_decay or not (is_norm or name == "bias")
            depth = depths.get(f"{module_name}.{name}".lstrip("."), 0)
            group = groups.setdefault((depth, decays), {"params": []})
            group["params"].append(p)
            if not norm_weight_decay:
                group["weight_decay"] = weight_decay if decays else 0.0
            if layer_decay is not None:
                group["lr_scale"] = layer_decay**depth
    # The order of the plain split (decayed, then not): the first group's rate is the peak.
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], not k[1]))]


def layer_depths(model: nn.Module) -> dict[str, int]:
    """How many layers below the top each parameter sits, for layer-wise learning-rate
    decay (as timm's ``param_groups_layer_decay`` and BEiT's fine-tuning recipe): the
    classifier and everything after ``features`` are 0, the last of ``features`` (the
    stem, each block, the last conv) is 1, ..., the stem is ``len(features)``. A model
    wrapped by another (a distilled student) is found by its ``features`` path."""
    names = [n for n, _ in model.named_parameters()]
    prefixes = [n[: -len("features")] for n, m in model.named_modules() if n.endswith("features")]
    prefixes = [
        p for p in prefixes if isinstance(model.get_submodule(p + "features"), nn.Sequential)
    ]
    if not prefixes:
        raise MobileNetError(
            "--layer-decay needs a model whose layers are a sequence (a MobileNet classifier)"
        )
    prefix = prefixes[0] + "features."
    count = len(model.get_submodule(prefix[:-1]))
    depths = {}
    for name in names:
        if name.startswith(prefix):
            depths[name] = count - int(name[len(prefix) :].split(".", 1)[0])
        else:
            depths[name] = 0
    return depths


def build_optimizer(model: nn.Module, recipe: Recipe, lr: float) -> Optimizer:
    groups = param_groups(model, recipe.weight_decay, recipe.norm_weight_decay, recipe.layer_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    wd = recipe.weight_decay
    if recipe.optimizer == "rmsprop_tf":
        return RMSpropTF(groups, lr, recipe.rmsprop_decay, recipe.momentum, recipe.rmsprop_eps, wd)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr, momentum=recipe.momentum, nesterov=True, weight_decay=wd)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr, betas=recipe.adam_betas, eps=recipe.adam_eps, weight_decay=wd
        )
    raise MobileNetError(f"unknown optimizer {recipe.optimizer!r}")


def warmup_cosine(
    epoch: float, warmup_epochs: float, epochs: float, min_ratio: float = 0.0
) -> float:
    """Linear warm-up over ``warmup_epochs``, then cosine decay to ``min_ratio`` at
    ``epochs``: the learning rate at (fractional) ``epoch`` as a fraction of the peak."""
    if warmup_epochs and epoch < warmup_epochs:
        return (epoch + 1e-3) / warmup_epochs
    progress = min(max(epoch - warmup_epochs, 0.0) / max(epochs - warmup_epochs, 1e-9), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(recipe: Recipe, epoch: float, epochs: int) -> float:
    """The learning rate at (fractional) ``epoch`` as a fraction of the initial rate."""
    if recipe.schedule == "cosine":
        return warmup_cosine(epoch, recipe.warmup_epochs, epochs, recipe.min_lr_ratio)
    if recipe.warmup_epochs and epoch < recipe.warmup_epochs:
        return (epoch + 1e-3) / recipe.warmup_epochs
    if recipe.schedule == "exponential":  # staircase: x decay_rate every decay_epochs
        return recipe.decay_rate ** math.floor(epoch / recipe.decay_epochs)
    raise MobileNetError(f"unknown schedule {recipe.schedule!r}")


def build_scheduler(
    optimizer: Optimizer, recipe: Recipe, epochs: int, steps_per_epoch: int
) -> LambdaLR:
    """A per-step schedule (call ``step()`` after every optimizer step)."""
    return LambdaLR(optimizer, lambda step: lr_factor(recipe, step / steps_per_epoch, epochs))


def build_ema(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics.

    As TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``, which the papers'
    reference code uses, the decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early
    averages are not dominated by the random initialisation.
    """
    if not decay:
        return None

    def ema(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor):
        if not averaged.is_floating_point():
            # Counters and flags (BatchNorm's batch count, fake quantization's on/off
            # switches and zero points) are taken as they are: an average of integers would
            # be truncated, and 1 * d + 1 * (1 - d) can round below 1.
            return current
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        return averaged * d + current * (1 - d)

    return WeightEMA(model, avg_fn=ema, use_buffers=True)


class WeightEMA(AveragedModel):
    """torch's :class:`~torch.optim.swa_utils.AveragedModel` over weights and buffers, for
    networks whose first forward sizes some buffers (fake quantization's per-channel
    scales and zero points start as one element): those follow the network's size."""

    def update_parameters(self, model: nn.Module) -> None:
        for averaged, current in zip(self.module.buffers(), model.buffers(), strict=True):
            if averaged.shape != current.shape:
                averaged.resize_(current.shape)
        super().update_parameters(model)
