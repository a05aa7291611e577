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
  output rows reads two source rows each. :func:`upsample_rows` computes a band as
  PyTorch's CPU kernel computes those rows of the whole image, bit for bit: the source
  rows resized along the width by :func:`torch.nn.functional.interpolate` itself (the
  other axis keeps its size, which the kernel copies exactly), then each output row
  ``t0 * l0 + t1 * l1`` from two of them, with the kernel's weights and rounding
  (:func:`resize_rows`). LR-ASPP's upsampling of its 128-channel branch to output stride
  8 is classified band by band into the logits; the model's final upsampling to the
  input size is written band by band into the output, or arg-maxed into a label map.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import NamedTuple

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

__all__ = [
    "VECTORISED_SIZE",
    "plan_resize_rows",
    "register_head_forms",
    "resize_rows",
    "row_bands",
    "source_span",
    "upsample_rows",
]


# --------------------------------------------------------------------------- upsampling


def row_bands(rows: int, band_rows: int | None) -> Iterator[tuple[int, int]]:
    """``[r0, r1)`` bands of at most ``band_rows`` rows (``None``: one band)."""
    step = band_rows or rows
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


# PyTorch's CPU kernel resizes an output of at most this height + width (and one of 3
# channels on one thread) on a vectorised path that rounds in another order.
VECTORISED_SIZE = 128

RowSource = Callable[[int, int], Tensor]


def _source_rows(n_in: int, n_out: int, r0: int, r1: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For output rows ``[r0, r1)`` of a bilinear resize from ``n_in`` to ``n_out`` rows
    (``align_corners=False``): the two source rows each reads and their two weights,
    ``(i0, i1, l0, l1)``, as PyTorch's CPU kernel computes them (:func:`_resize_weights`)."""
    return tuple(v[r0:r1] for v in _resize_weights(n_in, n_out))  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _resize_weights(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`_source_rows` for every output row (a few KiB, kept: every band reads them).

    The source coordinate of output row ``r`` is ``scale * (r + 0.5) - 0.5``, ``scale =
    n_in / n_out`` in float32, clamped at 0, with one rounding (the kernel's fused
    multiply-add: rounded twice, it moves values by up to 1e-4 of their scale at 520 ->
    375 rows); an unchanged size copies its rows."""
    rows = torch.arange(n_out)
    if n_in == n_out:
        return rows, rows, torch.ones(n_out), torch.zeros(n_out)
    scale = float(torch.tensor(n_in, dtype=torch.float32) / n_out)
    # exact in float64 (a 24-bit scale times a half-integer), then rounded once
    src = (scale * (rows.double() + 0.5) - 0.5).float().clamp_(min=0)
    i0 = src.long().clamp_(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    l1 = (src - i0).clamp_(0, 1)
    return i0, i1, 1 - l1, l1


class _Band(NamedTuple):
    """Output rows ``[r0, r1)`` of a resize: the source rows ``[lo, hi)`` they read, the
    runs ``(a, b, row)`` of band rows ``[a, b)`` whose first (``runs0``) or second
    (``runs1``) source row is ``row``, and the weights of the two, ``l0`` and ``l1``."""

    lo: int
    hi: int
    runs0: tuple[tuple[int, int, int], ...]
    runs1: tuple[tuple[int, int, int], ...]
    l0: Tensor
    l1: Tensor


@functools.lru_cache(maxsize=256)
def _band(n_in: int, n_out: int, r0: int, r1: int) -> _Band:
    """:class:`_Band` of output rows ``[r0, r1)`` from ``n_in`` to ``n_out`` rows (kept: a
    label map computes each band once per class)."""
    i0, i1, l0, l1 = _source_rows(n_in, n_out, r0, r1)
    lo, hi = int(i0[0]), int(i1[-1]) + 1
    return _Band(lo, hi, tuple(_runs(i0)), tuple(_runs(i1)), l0, l1)


def _runs(index: Tensor) -> Iterator[tuple[int, int, int]]:
    """``(a, b, value)`` for each run ``index[a:b]`` of one value."""
    values, counts = torch.unique_consecutive(index, return_counts=True)
    a = 0
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        yield a, a + count, value
        a += count


def source_span(n_in: int, n_out: int, r0: int, r1: int) -> tuple[int, int]:
    """The source rows ``[lo, hi)`` that output rows ``[r0, r1)`` of a bilinear resize from
    ``n_in`` to ``n_out`` rows read."""
    band = _band(n_in, n_out, r0, r1)
    return band.lo, band.hi


def _resize_one_axis(x: Tensor, size: tuple[int, int], keep: int) -> Tensor:
    """``x``, ``(N, 1, H, W)``, resized to ``size`` where axis ``keep`` (2 or 3) keeps its
    length: the other axis resized as PyTorch's separable kernel does in a whole-image
    resize. Where the kernel would take its vectorised path instead (a small output), the
    kept axis is padded with zeros past that bound, and cut back."""
    short = VECTORISED_SIZE + 1 - size[0] - size[1]
    if short <= 0:
        return F.interpolate(x, size, mode="bilinear", align_corners=False)
    pad, grown = ((0, short), (size[0], size[1] + short))
    if keep == 2:
        pad, grown = ((0, 0, 0, short), (size[0] + short, size[1]))
    y = F.interpolate(F.pad(x, pad), grown, mode="bilinear", align_corners=False)
    return y.narrow(keep, 0, size[keep - 2])


def resize_rows(
    rows_of: RowSource,
    n_in: int,
    size: tuple[int, int],
    r0: int,
    r1: int,
    channels_last: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Rows ``[r0, r1)`` of the bilinear resize to ``size`` (``align_corners=False``) of a
    map of ``n_in`` rows, whose rows ``[lo, hi)`` ``rows_of(lo, hi)`` gives: ``(C, hi -
    lo, W)`` (the result is ``(C, r1 - r0, W')``), or ``(hi - lo, W, C)`` with
    ``channels_last`` (the result is ``(r1 - r0, W', C)``); written into ``out`` if given.

    Each value is the one the whole-image :func:`torch.nn.functional.interpolate` gives on
    the CPU, bit for bit, where that takes its separable path (an output of height + width
    above ``VECTORISED_SIZE``, more than 3 channels or more than one thread): the rows
    the band reads resized along the width by the kernel itself, then each output row
    ``t0 * l0 + t1 * l1`` from two of them, rounded as the kernel rounds it (``t1 * l1``,
    then ``t0 * l0`` added in one rounding, as ``addcmul`` does)."""
    axis = 0 if channels_last else 1
    band = _band(n_in, size[0], r0, r1)
    rows = rows_of(band.lo, band.hi)
    if channels_last:  # (k, W, C) as k images of one channel: W resized, C kept
        t = _resize_one_axis(rows[:, None], (size[1], rows.shape[2]), keep=3)[:, 0]
        shape = (-1, 1, 1)
    else:  # (C, k, W) as C images of one channel: the k rows kept, W resized
        t = _resize_one_axis(rows[:, None], (band.hi - band.lo, size[1]), keep=2)[:, 0]
        shape = (-1, 1)
    del rows
    if out is None:
        out = t.new_empty((*t.shape[:axis], r1 - r0, *t.shape[axis + 1 :]))
    # output rows that read the same source row take it at once (broadcast): no gathered copy
    for a, b, row in band.runs1:
        weight = band.l1[a:b].view(shape)
        torch.mul(t.narrow(axis, row - band.lo, 1), weight, out=out.narrow(axis, a, b - a))
    for a, b, row in band.runs0:
        source, weight = t.narrow(axis, row - band.lo, 1), band.l0[a:b].view(shape)
        out.narrow(axis, a, b - a).addcmul_(source, weight)
    return out


def upsample_rows(
    x: Tensor,
    size: tuple[int, int],
    r0: int,
    r1: int,
    channels_last: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """Rows ``[r0, r1)`` of the bilinear resize of ``x`` to ``size`` (``align_corners=False``,
    :func:`resize_rows`). ``x`` is an ``(H, W, C)`` map (``channels_last``; the result is
    ``(r1 - r0, W', C)``) or a ``(C, H, W)`` one (the result is ``(C, r1 - r0, W')``)."""
    axis = 0 if channels_last else 1

    def rows_of(lo: int, hi: int) -> Tensor:
        return x.narrow(axis, lo, hi - lo)

    return resize_rows(rows_of, x.shape[axis], size, r0, r1, channels_last, out)


def plan_resize_rows(
    ledger: Ledger,
    c: int,
    size_in: tuple[int, int],
    size: tuple[int, int],
    r0: int,
    r1: int,
    channels_last: bool = False,
    source: int = 0,
    into: bool = False,
) -> int:
    """Replay :func:`resize_rows` (or :func:`upsample_rows`) of a ``c``-channel map of
    ``size_in``: ``source`` is what ``rows_of`` allocated (0 for a view), freed once
    resized; the padding, the rows resized along the width, the band (none written
    ``into`` an ``out``). Returns the band's bytes, left allocated (the weights, a few
    KiB, left out)."""
    lo, hi = source_span(size_in[0], size[0], r0, r1)
    k = hi - lo
    kept = c if channels_last else k  # the axis the width resize keeps, padded if short
    short = max(0, VECTORISED_SIZE + 1 - kept - size[1])
    maps = c * k + short * (k if channels_last else c)  # rows of the width resize
    padded = ledger.alloc(4 * maps * size_in[1]) if short else 0
    t = ledger.alloc(4 * maps * size[1])
    ledger.free(padded + source)
    band = 0 if into else ledger.alloc(4 * c * (r1 - r0) * size[1])
    ledger.free(t)
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
            ledger.free(plan_resize_rows(ledger, f, high, low, r0, r1, channels_last=True))
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
