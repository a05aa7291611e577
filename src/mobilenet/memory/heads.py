"""The segmentation heads in the executor: LR-ASPP, DeepLabv3's ASPP head, the FCN head,
and the bilinear upsampling they end with, computed in bands of rows.

The heads run at the backbone's output stride (16 or 8) on (H, W, C) maps, with BatchNorm
folded. They keep to the executor's rule: a tensor is computed a piece at a time when the
whole would be large, and the result is the same function up to float rounding.

* **The last conv** of a V3 backbone (1x1 to 960 / 576 channels, the ``"high"`` tap) is
  the largest map a head reads. LR-ASPP reads it only through a 1x1 conv and a global
  mean, both sums over its channels: it is computed in channel groups no wider than its
  input, each group pooled and projected at once, so it never exists whole (as the
  classifier's last conv, :class:`~mobilenet.memory.executor.MemoryEfficientMobileNet`).
  DeepLab's dilated 3x3 convs read it whole, so there it is materialised.
* **ASPP**: ``project(concat(branches))`` is a 1x1 conv, so it equals the sum over the
  branches of the projection's slice for that branch: each branch is computed, projected
  into one accumulator and freed; the concatenation never exists. The image-pooling branch
  is constant over the map: its projection is a vector added to the bias.
* **Bilinear upsampling** (``align_corners=False``, as the models) is separable: a band of
  output rows reads two source rows each. :func:`upsample_rows` computes a band: the
  vertical interpolation as a small matrix product on the source rows it needs, the
  horizontal one with :func:`torch.nn.functional.interpolate` along the width only (the
  other axis keeps its size, which the kernel copies exactly). LR-ASPP's upsampling of
  its 128-channel branch to output stride 8 is classified band by band into the logits;
  the model's final upsampling to the input size is written band by band into the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MobileNetError
from ..layers import ConvBNAct
from .forms import FormOptions, register_form
from .ops import (
    Ledger,
    activate_,
    activation_kind,
    as_hwc,
    as_nchw,
    channel_groups,
    channels_last_weight,
    conv_bias,
)

__all__ = ["plan_upsample", "register_head_forms", "row_bands", "upsample_rows"]


# --------------------------------------------------------------------------- upsampling


def row_bands(rows: int, band_rows: int | None) -> Iterator[tuple[int, int]]:
    """``[r0, r1)`` bands of at most ``band_rows`` rows (``None``: one band)."""
    step = band_rows or rows
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _source_rows(n_in: int, n_out: int, r0: int, r1: int) -> tuple[int, int, Tensor]:
    """The source rows ``[lo, hi)`` that output rows ``[r0, r1)`` of a bilinear resize from
    ``n_in`` to ``n_out`` rows read, and the ``(r1 - r0, hi - lo)`` interpolation matrix.

    The source coordinate of output row ``r`` is ``(r + 0.5) * n_in / n_out - 0.5``,
    clamped at 0, in float32, as PyTorch's kernel computes it (``align_corners=False``)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    src = (scale * (torch.arange(r0, r1, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0)
    i0 = src.long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    l1 = (src - i0).clamp_(0, 1)
    lo, hi = int(i0[0]), int(i1[-1]) + 1
    m = torch.zeros(r1 - r0, hi - lo)
    rows = torch.arange(r1 - r0)
    m.index_put_((rows, i0 - lo), 1 - l1, accumulate=True)
    m.index_put_((rows, i1 - lo), l1, accumulate=True)
    return lo, hi, m


def upsample_rows(
    x: Tensor, size: tuple[int, int], r0: int, r1: int, channels_last: bool = True
) -> Tensor:
    """Rows ``[r0, r1)`` of the bilinear resize of ``x`` to ``size`` (``align_corners=False``).

    ``x`` is an ``(H, W, C)`` map (``channels_last``; the result is ``(r1 - r0, W', C)``)
    or a ``(C, H, W)`` one (the result is ``(C, r1 - r0, W')``)."""
    n_in = x.shape[0] if channels_last else x.shape[1]
    lo, hi, m = _source_rows(n_in, size[0], r0, r1)
    m = m.to(x.dtype)
    if channels_last:  # rows are the outer dimension: one product on (rows, W * C)
        rows = (m @ x[lo:hi].reshape(hi - lo, -1)).view(r1 - r0, *x.shape[1:])
        # (rows, W, C) read as one image of `rows` channels: W is resized, C copied
        size = (size[1], x.shape[2])
    else:
        rows = m @ x[:, lo:hi]  # (C, r1 - r0, W)
        size = (r1 - r0, size[1])  # rows copied, W resized
    return F.interpolate(rows[None], size, mode="bilinear", align_corners=False)[0]


def plan_upsample(ledger: Ledger, c: int, w_in: int, size: tuple[int, int], r0: int, r1: int):
    """Replay :func:`upsample_rows`: the interpolated rows, then the band; returns the band's
    bytes, left allocated (the interpolation matrix, a few KiB, is left out)."""
    rows = ledger.alloc(4 * c * (r1 - r0) * w_in)
    band = ledger.alloc(4 * c * (r1 - r0) * size[1])
    ledger.free(rows)
    return band


# --------------------------------------------------------------------------- convolutions


class _Conv(nn.Module):
    """A folded conv (a ``ConvBNAct`` or a bare ``nn.Conv2d``) and its activation, on an
    (H, W, C) map; a 1x1 conv is one matrix product on the flattened map."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        conv = layer.conv if isinstance(layer, ConvBNAct) else layer
        if not isinstance(conv, nn.Conv2d) or conv.stride != (1, 1) or conv.groups != 1:
            raise MobileNetError(f"unsupported layer in a segmentation head: {layer}")
        self.act = activation_kind(layer.act) if isinstance(layer, ConvBNAct) else "identity"
        self.pointwise = conv.kernel_size == (1, 1)
        self.padding, self.dilation = conv.padding, conv.dilation
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        if self.pointwise:  # (in, out): a group of input channels is a slice of its rows
            weight = conv.weight.detach().flatten(1).t().contiguous()
        else:
            weight = channels_last_weight(conv.weight)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", conv_bias(conv))

    def forward(self, x: Tensor) -> Tensor:
        """``(H, W, in)`` -> ``(H, W, out)``."""
        if self.pointwise:
            y = torch.addmm(self.bias, x.reshape(-1, x.shape[2]), self.weight)
            y = y.view(*x.shape[:2], self.out_channels)
        else:
            y = F.conv2d(as_nchw(x), self.weight, self.bias, 1, self.padding, self.dilation)
            y = as_hwc(y)
        return activate_(self.act, y)

    def vector(self, v: Tensor) -> Tensor:
        """The 1x1 conv on a map of one position (pooled features): ``(in,)`` -> ``(out,)``."""
        return activate_(self.act, torch.addmv(self.bias, self.weight.t(), v))

    def plan(self, ledger: Ledger, h: int, w: int) -> int:
        return ledger.alloc(4 * self.out_channels * h * w)


class _LastConv(nn.Module):
    """The backbone's last layer when it is a 1x1 conv (V3's 960 / 576 channels), computed
    in channel groups no wider than its input; without one (mobile DeepLabv3 on V2), the
    high tap is the last block's output, one group."""

    def __init__(self, last: nn.Module | None, in_channels: int) -> None:
        super().__init__()
        self.conv = _Conv(last) if last is not None else None
        if self.conv is not None and not self.conv.pointwise:
            raise MobileNetError("the last layer of a segmentation backbone must be a 1x1 conv")
        self.out_channels = self.conv.out_channels if self.conv is not None else in_channels
        self.ranges = [(0, self.out_channels)]
        if self.conv is not None:
            self.ranges = channel_groups(
                self.out_channels, math.ceil(self.out_channels / in_channels)
            )

    def group(self, flat: Tensor, c0: int, c1: int) -> Tensor:
        """Channels ``[c0, c1)`` of the high tap, ``(positions, c1 - c0)``, from the last
        block's flattened output."""
        conv = self.conv
        if conv is None:
            return flat[:, c0:c1]
        return activate_(conv.act, torch.addmm(conv.bias[c0:c1], flat, conv.weight[:, c0:c1]))

    def whole(self, x: Tensor) -> Tensor:
        return x if self.conv is None else self.conv(x)


# --------------------------------------------------------------------------- heads


class _LRASPP(nn.Module):
    """LR-ASPP (V3 Section 6.4) on the low tap and the last block's output."""

    def __init__(self, head: nn.Module, last: _LastConv, band_rows: int | None) -> None:
        super().__init__()
        self.high, self.band_rows = last, band_rows
        self.branch, self.gate = _Conv(head.branch), _Conv(head.gate)
        self.low_classifier = _Conv(head.low_classifier)
        self.high_classifier = _Conv(head.high_classifier)
        self.num_classes = self.low_classifier.out_channels

    def forward(self, low: Tensor, x: Tensor) -> Tensor:
        """The logits ``(h_low, w_low, classes)``."""
        h, w, f = x.shape[0], x.shape[1], self.branch.out_channels
        flat = x.view(h * w, x.shape[2])
        # branch(high) and the mean of high, one channel group of high at a time
        branch = x.new_empty(h * w, f).copy_(self.branch.bias.expand(h * w, f))
        pooled = x.new_empty(self.high.out_channels)
        for c0, c1 in self.high.ranges:
            y = self.high.group(flat, c0, c1)
            torch.mean(y, 0, out=pooled[c0:c1])
            branch.addmm_(y, self.branch.weight[c0:c1])
            del y
        activate_(self.branch.act, branch)
        branch.mul_(torch.sigmoid(self.gate.vector(pooled)))
        # low_classifier(low) + high_classifier(upsample(branch)), band by band
        hl, wl = low.shape[0], low.shape[1]
        bias = self.low_classifier.bias + self.high_classifier.bias
        logits = torch.addmm(bias, low.view(hl * wl, -1), self.low_classifier.weight)
        for r0, r1 in row_bands(hl, self.band_rows):
            band = upsample_rows(branch.view(h, w, f), (hl, wl), r0, r1)
            logits[r0 * wl : r1 * wl].addmm_(band.view(-1, f), self.high_classifier.weight)
            del band
        return logits.view(hl, wl, self.num_classes)

    def logits_size(self, low: tuple[int, int], high: tuple[int, int]) -> tuple[int, int]:
        return low

    def plan(self, ledger: Ledger, low: tuple[int, int], high: tuple[int, int]) -> int:
        """Replay :meth:`forward` (vectors of one value per channel left out); returns the
        bytes of the logits, left allocated."""
        n, f = high[0] * high[1], self.branch.out_channels
        branch = ledger.alloc(4 * n * f)
        if self.high.conv is not None:
            c = max(c1 - c0 for c0, c1 in self.high.ranges)
            ledger.free(ledger.alloc(4 * n * c))
        logits = ledger.alloc(4 * low[0] * low[1] * self.num_classes)
        for r0, r1 in row_bands(low[0], self.band_rows):
            ledger.free(plan_upsample(ledger, f, high[1], low, r0, r1))
        ledger.free(branch)
        return logits


class _DeepLab(nn.Module):
    """DeepLabv3's head (ASPP, [3x3 conv], classifier) on the last block's output."""

    def __init__(self, head: nn.Module, last: _LastConv) -> None:
        super().__init__()
        self.high = last
        aspp = head.aspp
        self.branches = nn.ModuleList(_Conv(branch) for branch in aspp.branches)
        self.image_pool, self.project = _Conv(aspp.image_pool), _Conv(aspp.project)
        self.refine = None if isinstance(head.refine, nn.Identity) else _Conv(head.refine)
        self.classifier = _Conv(head.classifier)
        self.num_classes = self.classifier.out_channels

    def forward(self, low: Tensor, x: Tensor) -> Tensor:
        """The logits ``(h, w, classes)`` at the high tap's size (``low`` is not read)."""
        h, w = x.shape[0], x.shape[1]
        high = self.high.whole(x)
        c = self.project.out_channels
        weights = self.project.weight.split(self.branches[0].out_channels)  # one per branch
        # The image-pooling branch is one vector: its projection joins the bias.
        pool = self.image_pool.vector(high.mean((0, 1)))
        bias = torch.addmv(self.project.bias, weights[-1].t(), pool)
        acc = x.new_empty(h * w, c).copy_(bias.expand(h * w, c))
        for branch, weight in zip(self.branches, weights[:-1], strict=True):
            y = branch(high)
            acc.addmm_(y.view(h * w, -1), weight)  # project(concat) = sum of the slices
            del y
        del high
        y = activate_(self.project.act, acc).view(h, w, c)  # dropout: identity at inference
        if self.refine is not None:
            y = self.refine(y)
        del acc
        return self.classifier(y)

    def logits_size(self, low: tuple[int, int], high: tuple[int, int]) -> tuple[int, int]:
        return high

    def plan(self, ledger: Ledger, low: tuple[int, int], high: tuple[int, int]) -> int:
        n = high[0] * high[1]
        whole = 0 if self.high.conv is None else self.high.conv.plan(ledger, *high)
        acc = ledger.alloc(4 * n * self.project.out_channels)
        for branch in self.branches:
            ledger.free(branch.plan(ledger, *high))
        ledger.free(whole)
        y = acc
        if self.refine is not None:
            y = self.refine.plan(ledger, *high)
            ledger.free(acc)
        logits = self.classifier.plan(ledger, *high)
        ledger.free(y)
        return logits


class _FCN(nn.Module):
    """The auxiliary FCN head on the low tap: 3x3 conv, [dropout], 1x1 classifier."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv, self.classifier = _Conv(head.conv), _Conv(head.classifier)
        self.num_classes = self.classifier.out_channels

    def forward(self, low: Tensor, x: Tensor | None = None) -> Tensor:
        return self.classifier(self.conv(low))

    def logits_size(self, low: tuple[int, int], high: tuple[int, int]) -> tuple[int, int]:
        return low

    def plan(self, ledger: Ledger, low: tuple[int, int], high: tuple[int, int]) -> int:
        hidden = self.conv.plan(ledger, *low)
        logits = self.classifier.plan(ledger, *low)
        ledger.free(hidden)
        return logits


def register_head_forms() -> None:
    """Register the executor forms of the segmentation heads in
    :data:`~mobilenet.memory.forms.EXECUTOR_FORMS` (again is harmless). Called when a
    segmentation model's executor is built: the heads are classes of
    :mod:`mobilenet.segmentation`, which ``import mobilenet`` leaves unloaded."""
    from ..segmentation.heads import DeepLabHead, FCNHead, LRASPPHead

    register_form(LRASPPHead, lambda head, o: _LRASPP(head, _high(o), o.band_rows))
    register_form(DeepLabHead, lambda head, o: _DeepLab(head, _high(o)))
    register_form(FCNHead, lambda head, o: _FCN(head))  # the auxiliary head: low tap only


def _high(options: FormOptions) -> _LastConv:
    """The high tap a head reads: the backbone's last 1x1 conv, or the last block's output."""
    return _LastConv(options.last, options.in_channels)
