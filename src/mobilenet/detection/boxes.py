"""SSD's default boxes, box coding and matching (Liu et al., ECCV 2016, Section 2.2).

Default boxes: feature map ``k`` of ``m`` has scale ``s_k = s_min + (s_max - s_min) *
k / (m - 1)`` (SSD eq. 4; SSDLite uses ``s_min = 0.2``, ``s_max = 0.95``), and every
location carries six boxes: aspect ratio 1 at ``s_k``, aspect ratio 1 at the extra scale
``sqrt(s_k * s_{k+1})`` (with ``s_m = 1``), and ``s_k * sqrt(a), s_k / sqrt(a)`` for
``a`` in {2, 1/2, 3, 1/3}. Centres sit at ``((i + 0.5) / f_k, (j + 0.5) / f_k)``. Widths
and heights are clipped to the image in (cx, cy, w, h) form, as the SSD reference and
torchvision do. The order (location-major: all six boxes of a location, then the next
location, row by row) is the order of the head's outputs.

Box coding (SSD eq. 2, with the variances of the reference code as weights): a box is
coded against its default box as ``(wx * dx / w_d, wy * dy / h_d, ww * log(w / w_d),
wh * log(h / h_d))`` with weights (10, 10, 5, 5) (i.e. variances 0.1 and 0.2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

__all__ = ["BoxCoder", "DefaultBoxes", "match"]


class DefaultBoxes:
    """The default boxes of an SSD head, in pixels of the network's input (x1, y1, x2, y2).

    ``aspect_ratios`` holds, per feature map, the ratios ``a > 1`` used in pairs
    (``a`` and ``1/a``); ``[2, 3]`` gives the six boxes per location of SSDLite.
    """

    def __init__(
        self,
        num_maps: int = 6,
        aspect_ratios: Sequence[float] = (2, 3),
        min_scale: float = 0.2,
        max_scale: float = 0.95,
        clip: bool = True,
    ) -> None:
        if num_maps < 2:
            raise ValueError("SSD needs at least two feature maps")
        self.num_maps = num_maps
        self.aspect_ratios = tuple(float(a) for a in aspect_ratios)
        self.min_scale, self.max_scale, self.clip = min_scale, max_scale, clip
        step = (max_scale - min_scale) / (num_maps - 1)
        self.scales = [min_scale + step * k for k in range(num_maps)] + [1.0]
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def boxes_per_location(self) -> int:
        return 2 + 2 * len(self.aspect_ratios)

    def shapes(self, k: int) -> torch.Tensor:
        """The ``(w, h)`` of each box at one location of map ``k``, as image fractions."""
        s, s_next = self.scales[k], self.scales[k + 1]
        pairs = [(s, s), (math.sqrt(s * s_next),) * 2]
        for a in self.aspect_ratios:
            pairs += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
        wh = torch.tensor(pairs, dtype=torch.float32)
        return wh.clamp(0, 1) if self.clip else wh

    def __call__(
        self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
    ) -> torch.Tensor:
        """All default boxes ``[A, 4]`` for feature maps of ``grid_sizes`` (h, w) on an
        image of ``image_size`` (h, w): float32, on the CPU, computed once per shape."""
        key = (tuple(map(tuple, grid_sizes)), tuple(image_size))
        if key not in self._cache:
            self._cache[key] = self._compute(grid_sizes, image_size)
        return self._cache[key]

    def _compute(
        self, grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int]
    ) -> torch.Tensor:
        if len(grid_sizes) != self.num_maps:
            raise ValueError(f"expected {self.num_maps} feature maps, got {len(grid_sizes)}")
        height, width = image_size
        per_map = []
        for k, (fh, fw) in enumerate(grid_sizes):
            cy = (torch.arange(fh, dtype=torch.float32) + 0.5) / fh
            cx = (torch.arange(fw, dtype=torch.float32) + 0.5) / fw
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            centres = torch.stack([cx.reshape(-1), cy.reshape(-1)], 1)  # [fh * fw, 2]
            wh = self.shapes(k)  # [B, 2]
            centres = centres[:, None].expand(-1, len(wh), 2)
            wh = wh[None].expand(len(centres), -1, 2)
            cxcywh = torch.cat([centres, wh], 2).reshape(-1, 4)
            per_map.append(cxcywh)
        cxcywh = torch.cat(per_map)
        scale = torch.tensor([width, height], dtype=torch.float32)
        return torch.cat(
            [
                (cxcywh[:, :2] - 0.5 * cxcywh[:, 2:]) * scale,
                (cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]) * scale,
            ],
            1,
        )


class BoxCoder:
    """Encode boxes as offsets from default boxes and decode them back (SSD eq. 2)."""

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        clip: float = math.log(1000.0 / 16),
    ) -> None:
        self.weights = weights
        self.clip = clip  # largest log-scale before exp(): keeps decoded sizes finite

    def encode(self, boxes: torch.Tensor, defaults: torch.Tensor) -> torch.Tensor:
        """Offsets ``[..., 4]`` of ``boxes`` (x1, y1, x2, y2) from ``defaults`` (same shape)."""
        wx, wy, ww, wh = self.weights
        dw, dh, dcx, dcy = _size_centre(defaults)
        bw, bh, bcx, bcy = _size_centre(boxes)
        return torch.stack(
            [
                wx * (bcx - dcx) / dw,
                wy * (bcy - dcy) / dh,
                ww * torch.log(bw / dw),
                wh * torch.log(bh / dh),
            ],
            -1,
        )

    def decode(self, codes: torch.Tensor, defaults: torch.Tensor) -> torch.Tensor:
        """Boxes (x1, y1, x2, y2) from offsets ``codes [..., 4]`` and ``defaults [..., 4]``."""
        wx, wy, ww, wh = self.weights
        dw, dh, dcx, dcy = _size_centre(defaults.to(codes.dtype))
        cx = codes[..., 0] / wx * dw + dcx
        cy = codes[..., 1] / wy * dh + dcy
        half_w = 0.5 * (torch.exp((codes[..., 2] / ww).clamp(max=self.clip)) * dw)
        half_h = 0.5 * (torch.exp((codes[..., 3] / wh).clamp(max=self.clip)) * dh)
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


def _size_centre(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return w, h, boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h


def match(
    gt_boxes: torch.Tensor, defaults: torch.Tensor, iou_threshold: float = 0.5
) -> torch.Tensor:
    """The ground-truth index each default box is matched to, -1 for background.

    SSD's matching strategy (Section 2.2): a default box takes the ground truth it
    overlaps most if their IoU is at least ``iou_threshold``; in addition every ground
    truth takes its best default box, whatever the overlap, so no object goes unmatched.
    """
    if gt_boxes.numel() == 0:
        return torch.full((len(defaults),), -1, dtype=torch.int64, device=defaults.device)
    iou = box_iou(gt_boxes, defaults)  # [G, A]
    best_iou, matched = iou.max(0)
    matched[best_iou < iou_threshold] = -1
    best_default = iou.argmax(1)
    matched[best_default] = torch.arange(len(gt_boxes), device=defaults.device)
    return matched
