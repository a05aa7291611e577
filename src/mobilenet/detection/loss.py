"""The SSD training loss (Liu et al., Section 2.2): localisation + confidence.

``L = (L_conf + L_loc) / N`` over the ``N`` default boxes matched to an object:

* ``L_loc``: smooth L1 between the predicted and the encoded ground-truth offsets, on
  matched boxes only;
* ``L_conf``: softmax cross-entropy; of the unmatched (background) boxes only the
  hardest are kept, at most three per matched box (hard negative mining), so the
  thousands of easy background boxes do not swamp the few objects.

``focal=True`` replaces the mined cross-entropy by the focal loss of RetinaNet (Lin et
al., ICCV 2017) on every default box: ``alpha_t * (1 - p_t)^gamma * CE`` (softmax form,
``alpha`` for objects and ``1 - alpha`` for background), still divided by ``N``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .boxes import BoxCoder, match

__all__ = ["LossConfig", "ssd_loss"]


@dataclass(frozen=True)
class LossConfig:
    iou_threshold: float = 0.5  # SSD: a default box matches an object at IoU >= 0.5
    neg_pos_ratio: int = 3  # SSD: at most 3 mined negatives per positive
    focal: bool = False
    focal_alpha: float = 0.25  # RetinaNet's alpha and gamma
    focal_gamma: float = 2.0


def ssd_loss(
    cls_logits: torch.Tensor,
    box_codes: torch.Tensor,
    defaults: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    coder: BoxCoder,
    config: LossConfig = LossConfig(),
) -> dict[str, torch.Tensor]:
    """``{"bbox_regression", "classification"}`` for a batch.

    Args:
        cls_logits: ``[N, A, C]`` class scores (class 0 is the background).
        box_codes: ``[N, A, 4]`` predicted offsets.
        defaults: ``[A, 4]`` default boxes (x1, y1, x2, y2), in the input's pixels.
        targets: per image ``{"boxes": [G, 4], "labels": [G]}`` in the same pixels, labels
            in ``1 .. C - 1``.
    """
    defaults = defaults.to(box_codes.device)
    cls_targets, box_targets, positive = [], [], []
    for target in targets:
        matched = match(target["boxes"], defaults, config.iou_threshold)
        is_positive = matched >= 0
        index = matched.clamp(min=0)
        labels = target["labels"].to(torch.int64)
        if len(labels):
            cls_targets.append(torch.where(is_positive, labels[index], 0))
            box_targets.append(coder.encode(target["boxes"][index], defaults))
        else:
            cls_targets.append(
                torch.zeros(len(defaults), dtype=torch.int64, device=defaults.device)
            )
            box_targets.append(torch.zeros_like(defaults))
        positive.append(is_positive)
    cls_target = torch.stack(cls_targets)
    box_target = torch.stack(box_targets)
    pos = torch.stack(positive)
    num_pos = pos.sum().clamp(min=1).to(box_codes.dtype)

    box_loss = F.smooth_l1_loss(box_codes[pos], box_target[pos], reduction="sum")

    num_classes = cls_logits.shape[-1]
    ce = F.cross_entropy(
        cls_logits.reshape(-1, num_classes), cls_target.reshape(-1), reduction="none"
    )
    ce = ce.view_as(cls_target)
    if config.focal:
        p_t = torch.exp(-ce)
        alpha = torch.where(pos, config.focal_alpha, 1 - config.focal_alpha)
        cls_loss = (alpha * (1 - p_t) ** config.focal_gamma * ce).sum()
    else:
        # Hard negative mining: per image, the background boxes with the largest loss,
        # at most neg_pos_ratio times the image's positives.
        negative_ce = ce.detach().masked_fill(pos, -1.0)
        rank = negative_ce.argsort(1, descending=True).argsort(1)
        num_neg = config.neg_pos_ratio * pos.sum(1, keepdim=True)
        negative = (rank < num_neg) & ~pos
        cls_loss = ce[pos].sum() + ce[negative].sum()
    return {"bbox_regression": box_loss / num_pos, "classification": cls_loss / num_pos}
