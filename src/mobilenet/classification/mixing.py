"""Batch mixing (MixUp, CutMix) and the loss on the soft targets it makes.

MixUp (Zhang et al., 2018) blends each image with its neighbour in the batch,
``lam * x_i + (1 - lam) * x_{i-1}`` with ``lam ~ Beta(alpha, alpha)``; CutMix (Yun et al.,
2019) pastes a box of the neighbour, ``lam`` being the share of the image left untouched.
The targets are mixed with the same ``lam``. The mixing itself is torchvision's
(``torchvision.transforms.v2.MixUp`` and ``CutMix``); this module only decides, per batch,
whether to mix and which of the two to use, as timm's ``Mixup`` (``--mixup``, ``--cutmix``,
``--mixup-prob``, ``--mixup-switch-prob``) and torchvision's classification reference do.

Every random draw (whether to mix, which mixing, ``lam``, the box) comes from torch's
global RNG: torchvision samples ``lam`` with ``torch.distributions.Beta`` and the box
with ``torch.randint``, and the choices here use ``torch.rand``. The engine re-seeds
that RNG at the start of every epoch, so a resumed run mixes exactly as an unbroken one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..errors import MobileNetError

__all__ = ["BatchMixing", "check_mixing", "dominant_label", "soft_target_cross_entropy"]


def check_mixing(mixup: float, cutmix: float, mix_prob: float, switch_prob: float) -> None:
    """Refuse a negative or non-finite Beta alpha, or a probability outside [0, 1]."""
    for flag, alpha in (("--mixup", mixup), ("--cutmix", cutmix)):
        if not (math.isfinite(alpha) and alpha >= 0):
            raise MobileNetError(
                f"{flag} {alpha}: the Beta distribution's alpha must be a finite number >= 0 "
                "(0 turns it off)"
            )
    for flag, prob in (("--mix-prob", mix_prob), ("--switch-prob", switch_prob)):
        if not 0 <= prob <= 1:  # also refuses NaN
            raise MobileNetError(f"{flag} {prob}: a probability must lie in [0, 1]")


class BatchMixing:
    """MixUp and/or CutMix applied to a whole batch: ``(images, labels) -> (images, targets)``.

    ``mixup`` and ``cutmix`` are the alphas of ``Beta(alpha, alpha)`` (0: that mixing is off).
    A batch is mixed with probability ``mix_prob``; with both mixings on, a mixed batch
    uses CutMix with probability ``switch_prob`` and MixUp otherwise. An unmixed batch keeps
    its images and gets one-hot targets. The targets are always float ``(B, num_classes)``
    rows summing to 1. A draw is only made when its outcome is open (``mix_prob`` strictly
    between 0 and 1; both mixings on), so with one mixing always on the batch is exactly
    what torchvision's transform gives from the same RNG state.
    """

    def __init__(
        self,
        mixup: float,
        cutmix: float,
        mix_prob: float,
        switch_prob: float,
        num_classes: int,
    ) -> None:
        check_mixing(mixup, cutmix, mix_prob, switch_prob)
        if num_classes < 1:
            raise MobileNetError(f"batch mixing needs at least one class, not {num_classes}")
        self.num_classes = num_classes
        self.mix_prob = float(mix_prob)
        self.switch_prob = float(switch_prob)
        # Beta(0, 0) is no distribution: a mixing that is off is not built at all.
        self.mixup = v2.MixUp(alpha=mixup, num_classes=num_classes) if mixup > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix, num_classes=num_classes) if cutmix > 0 else None

    @property
    def enabled(self) -> bool:
        """Whether any batch can be mixed at all."""
        return self.mix_prob > 0 and (self.mixup is not None or self.cutmix is not None)

    def choose(self) -> v2.Transform | None:
        """The mixing of the next batch (None: leave it unmixed), drawn from torch's RNG."""
        if not self.enabled:
            return None
        if self.mix_prob < 1 and float(torch.rand(())) >= self.mix_prob:
            return None
        if self.mixup is None or self.cutmix is None:
            return self.mixup or self.cutmix
        return self.cutmix if float(torch.rand(())) < self.switch_prob else self.mixup

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of float images ``(B, C, H, W)`` and class indices ``(B,)``, on any device."""
        mixing = self.choose()
        if mixing is None:
            return images, F.one_hot(labels, self.num_classes).float()
        return mixing(images, labels)


def soft_target_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy against probability rows, averaged over the batch.

    Label smoothing is applied to the soft targets as timm's and torchvision's training
    scripts compose it with mixing, ``t * (1 - ls) + ls / C``; on one-hot targets this is
    exactly ``F.cross_entropy(logits, labels, label_smoothing=ls)``.
    """
    log_probs = F.log_softmax(logits, dim=1)
    targets = soft_targets.to(log_probs.dtype)
    if label_smoothing:
        targets = targets * (1 - label_smoothing) + label_smoothing / logits.shape[1]
    return -(targets * log_probs).sum(dim=1).mean()


def dominant_label(soft_targets: torch.Tensor) -> torch.Tensor:
    """The label with the larger share of each mixed target (train top-1 counts against it)."""
    return soft_targets.argmax(dim=1)
