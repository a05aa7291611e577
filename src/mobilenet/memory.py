"""Memory-efficient inference for inverted-residual networks (V2 Section 5.1).

A bottleneck block is ``F(x) = [A . N . B] x``: A the expanding 1x1 conv (k -> n channels),
N the per-channel part (activation, depthwise conv, activation) and B the projecting 1x1
conv (n -> k'). N works channel by channel, so the expanded tensor can be split into ``t``
groups: ``F(x) = sum_i (A_i . N . B_i)(x)``, where A_i gives the i-th group of A's output
channels and B_i takes the i-th group of B's input channels. :func:`memory_efficient`
computes every block that way, one group at a time, accumulating B_i's products in place
into one output buffer (initialised with the projection's bias, plus the input when the
block has a residual connection); each group's tensors are freed before the next group
starts, so only ``n / t`` channels of the inner tensor are alive at once. The MAdds are
unchanged; the paper reports that t between 2 and 5 costs little speed.

Beyond the paper's executor:

* **Squeeze-excite** (V3) scales each channel by a gate computed from the spatial mean of
  the whole expanded tensor. It is computed exactly in two passes: the first computes the
  groups only to pool them (one channel vector), the second recomputes each group, scales
  it by its slice of the gate and projects it. The second pass repeats the first's expand
  and depthwise convs: that is the time squeeze-excite costs (``benchmarks/
  memory_efficient.py`` records it). With ``t = 1`` there is nothing to split and the
  block runs in one pass.
* **Spatial tiling.** The early layers at output stride 2 and 4 hold the largest tensors
  (at 1024x1024, the stem's output alone is 32 MiB). The leading layers up to the first
  block that reaches output stride 8 (and before any squeeze-excite) run as one tiled
  segment: horizontally banded, ``band_rows`` output rows of the segment at a time, each
  band recomputing the halo rows its depthwise convs need. Only the segment's output is
  ever materialised whole; the halos cost some recomputation (about 10-20% of the
  segment's MAdds at the default 16 rows).
* **The head.** The last 1x1 conv is fused with the global average pool, computed in
  channel groups no larger than its input, so its output map is never materialised.
* **Batches** are processed one image at a time.

BatchNorm is folded first (:func:`~mobilenet.export.prepare.fold_batchnorm`) and every
activation runs in place. The input tensor and the weights are not counted as activation
memory, here or in the measurements.

Memory is reported three ways (:func:`memory_report`, ``mobilenet memory``):

* **analytic**: the peak of the live activations at fp32, from the shapes alone. For the
  standard forward it is :func:`mobilenet.cost`'s ``peak_activation_bytes`` (times the
  batch); for the executor it replays the executor's schedule of allocations.
* **paper bound**: the largest ``|input| + |output|`` of any operation, an inverted
  residual block counting as one operation (V2 Section 5.1).
* **measured**: the peak total size of the storages that the forward pass really
  allocates, observed with :class:`PeakMemory` (a dispatch mode that sees every operator's
  output and a finaliser that sees every storage freed). Workspaces private to a kernel
  (e.g. a convolution's reorder buffers) are below the operator level and are not seen, in
  either forward. The executor's measured peak equals its analytic one. The standard
  forward measures one tensor above its analytic figure: eager ``nn.Sequential`` holds
  each block's input until the block returns, where the traced graph frees it after its
  last reader (V2 at 224: 9.95 MiB measured, 9.19 MiB analytic, the 0.77 MiB of the
  112x112x16 input of the first expanding block).

The standard forward used for comparison is the model with BatchNorm folded, NCHW, in
inference mode (``prepare_for_inference(model, channels_last=False)``). The executor keeps
its maps as (H, W, C) (channels_last), which makes the depthwise convs faster on CPUs: part
of its time advantage at large resolutions is that layout, not the splitting.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .blocks import InvertedResidual
from .errors import MobileNetError
from .export.prepare import prepare_for_inference
from .layers import ConvBNAct, SqueezeExcite

__all__ = [
    "MemoryEfficientMobileNet",
    "MemoryReport",
    "PeakMemory",
    "format_report",
    "measure_peak",
    "memory_efficient",
    "memory_report",
]

TILE_STRIDE = 8  # the tiled segment ends with the first block reaching this output stride
DEFAULT_BAND_ROWS = 16


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Window:
    """A convolution's geometry along one spatial axis."""

    kernel: int
    stride: int
    padding: int

    def out_size(self, n: int) -> int:
        return (n + 2 * self.padding - self.kernel) // self.stride + 1

    def rows_needed(self, o0: int, o1: int, n_in: int) -> tuple[int, int, int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[o0, o1)`` read, clipped to the image,
        and the zero rows above and below them that the padding supplies."""
        lo = o0 * self.stride - self.padding
        hi = (o1 - 1) * self.stride - self.padding + self.kernel
        return max(lo, 0), min(hi, n_in), max(-lo, 0), max(hi - n_in, 0)


def _window(conv: nn.Conv2d) -> _Window:
    if len(set(conv.kernel_size)) != 1 or len(set(conv.stride)) != 1:
        raise MobileNetError(f"square kernels and strides only, got {conv}")
    if conv.padding != (conv.kernel_size[0] // 2,) * 2 or conv.dilation != (1, 1):
        raise MobileNetError(f"'same'-style padding and no dilation only, got {conv}")
    return _Window(conv.kernel_size[0], conv.stride[0], conv.padding[0])


def _activation(module: nn.Module) -> str:
    """The in-place activation matching ``module``."""
    for kind, cls in _ACTIVATIONS.items():
        if type(module) is cls:
            return kind
    raise MobileNetError(f"no in-place form for the activation {type(module).__name__}")


_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
}


def _act_(kind: str, x: Tensor) -> Tensor:
    if kind == "relu6":  # nn.ReLU6 is hardtanh(0, 6)
        return F.hardtanh_(x, 0.0, 6.0)
    if kind == "relu":
        return x.relu_()
    if kind == "hardswish":
        return F.hardswish(x, inplace=True)
    return x


def _groups(channels: int, splits: int) -> list[tuple[int, int]]:
    """``splits`` contiguous channel ranges, sizes differing by at most one."""
    bounds = [channels * i // splits for i in range(splits + 1)]
    return list(itertools.pairwise(bounds))


def _padded(rows: int, width: int, channels: int, top: int, bottom: int, like: Tensor) -> Tensor:
    """An uninitialised ``(top + rows + bottom, width, channels)`` buffer, pad rows zeroed."""
    buf = like.new_empty(top + rows + bottom, width, channels)
    buf[:top].zero_()
    buf[top + rows :].zero_()
    return buf


def _nchw(x: Tensor) -> Tensor:
    """An ``(H, W, C)`` map as the ``(1, C, H, W)`` channels_last tensor it already is."""
    return x.permute(2, 0, 1)[None]


def _hwc(x: Tensor) -> Tensor:
    """The inverse of :func:`_nchw` for a channels_last ``(1, C, H, W)`` tensor."""
    out = x[0].permute(1, 2, 0)
    assert out.is_contiguous(), "expected a channels_last convolution output"
    return out


class _Ledger:
    """Replays a schedule of allocations: the analytic count of live bytes and its peak."""

    def __init__(self, live: int = 0) -> None:
        self.live = self.peak = live

    def alloc(self, nbytes: int) -> int:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        return nbytes

    def free(self, nbytes: int) -> None:
        self.live -= nbytes


# --------------------------------------------------------------------------- layers
#
# Inside the executor a feature map is an (H, W, C) tensor: a band of rows is then a
# contiguous slice, a 1x1 conv is one matrix product ((H*W, k) @ (k, n)), and the
# depthwise conv runs on channels_last data, which the CPU kernels prefer.


class _Stem(nn.Module):
    """The first conv + activation, reading the (C, H, W) image for a band of output rows."""

    def __init__(self, layer: ConvBNAct) -> None:
        super().__init__()
        conv = layer.conv
        self.window = _window(conv)
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.act = _activation(layer.act)
        self.register_buffer("weight", _channels_last(conv.weight))
        self.register_buffer("bias", _bias(conv))

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        return self.window.rows_needed(o0, o1, h_in)[:2]

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        """Output rows ``[o0, o1)`` of the image ``x`` (``a`` is 0: it is whole)."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        # The image's rows, as (H, W, C) with the padding rows: 3 channels, a small copy.
        src = _padded(hi - lo, x.shape[2], x.shape[0], top, bottom, x)
        src[top : top + hi - lo].copy_(x[:, lo - a : hi - a].permute(1, 2, 0))
        y = F.conv2d(
            _nchw(src), self.weight, self.bias, win.stride, (0, win.padding), groups=self.groups
        )
        del src
        y = _act_(self.act, _hwc(y))
        if out is not None:
            out.copy_(y)
            return out
        return y

    def plan(self, ledger: _Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
        """Replay :meth:`run` on ``ledger``; returns the bytes of the output it leaves."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        src = ledger.alloc(4 * self.in_channels * (top + hi - lo + bottom) * w_in)
        y = ledger.alloc(4 * self.out_channels * (o1 - o0) * win.out_size(w_in))
        ledger.free(src)
        if out:
            ledger.free(y)
            return 0
        return y


class _Block(nn.Module):
    """An inverted residual computed over ``splits`` channel groups of its expansion."""

    def __init__(self, block: InvertedResidual, splits: int) -> None:
        super().__init__()
        dw = block.dw.conv
        self.window = _window(dw)
        self.exp_channels = dw.in_channels
        self.out_channels = block.project.conv.out_channels
        self.residual = block.use_residual
        self.has_expand = isinstance(block.expand, ConvBNAct)
        self.groups = _groups(self.exp_channels, splits)
        if self.has_expand:
            self.expand_act = _activation(block.expand.act)
            expand = block.expand.conv
            # (k, n): A_i is a slice of its columns
            self.register_buffer("w_expand", expand.weight.detach().flatten(1).t().contiguous())
            self.register_buffer("b_expand", _bias(expand))
        self.dw_act = _activation(block.dw.act)
        self.register_buffer("w_dw", _channels_last(dw.weight))
        self.register_buffer("b_dw", _bias(dw))
        project = block.project.conv
        if _activation(block.project.act) != "identity":
            raise MobileNetError("the projection of an inverted residual must be linear")
        # (n, k'): B_i is a slice of its rows
        self.register_buffer("w_project", project.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("b_project", _bias(project))
        self.se = None
        if isinstance(block.se, SqueezeExcite):
            self.se = block.se
        elif not isinstance(block.se, nn.Identity):
            raise MobileNetError(f"unsupported squeeze-excite module {type(block.se).__name__}")

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        return self.window.rows_needed(o0, o1, h_in)[:2]

    def _inner(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, c0: int, c1: int) -> Tensor:
        """N(A_i x) for output rows ``[o0, o1)``: channels ``[c0, c1)`` after the depthwise
        conv and its activation; the expanded group is freed before returning."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        rows, width = hi - lo, x.shape[1]
        if (lo, hi, o0, o1) == (0, h_in, 0, win.out_size(h_in)):  # the whole map
            top = bottom = 0
            pad = (win.padding, win.padding)
        else:  # a band: the padding rows are explicit, where it touches the border
            pad = (0, win.padding)
        e = _padded(rows, width, c1 - c0, top, bottom, x)
        if self.has_expand:  # pw: A_i x, written straight into the padded buffer
            torch.addmm(
                self.b_expand[c0:c1],
                x[lo - a : hi - a].view(rows * width, x.shape[2]),
                self.w_expand[:, c0:c1],
                out=e[top : top + rows].view(rows * width, c1 - c0),
            )
            _act_(self.expand_act, e)
        else:
            e[top : top + rows].copy_(x[lo - a : hi - a, :, c0:c1])
        # dw
        d = F.conv2d(_nchw(e), self.w_dw[c0:c1], self.b_dw[c0:c1], win.stride, pad, groups=c1 - c0)
        del e
        return _act_(self.dw_act, _hwc(d))

    def _excite(self, pooled: Tensor) -> Tensor:
        se = self.se
        assert se is not None
        hidden = se.act(F.linear(pooled, se.fc1.weight.flatten(1), se.fc1.bias))
        return se.gate(F.linear(hidden, se.fc2.weight.flatten(1), se.fc2.bias))

    def _gate(self, x: Tensor, h_in: int) -> Tensor:
        """Squeeze-excite's first pass: the gate from the pooled groups, one at a time."""
        pooled = x.new_empty(self.exp_channels)
        h_out = self.window.out_size(h_in)
        for c0, c1 in self.groups:
            d = self._inner(x, 0, h_in, 0, h_out, c0, c1)
            torch.mean(d, (0, 1), out=pooled[c0:c1])
            del d
        return self._excite(pooled)

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        """Output rows ``[o0, o1)`` from ``x``, which holds input rows ``[a, a + len)``."""
        win = self.window
        w_out = win.out_size(x.shape[1])
        if out is None:
            out = x.new_empty(o1 - o0, w_out, self.out_channels)
        # One output buffer: the projection's bias, plus the shortcut (no separate add).
        if self.residual:
            torch.add(x[o0 - a : o1 - a], self.b_project, out=out)
        else:
            out.copy_(self.b_project.expand_as(out))
        acc = out.view((o1 - o0) * w_out, self.out_channels)
        gate = None
        if self.se is not None:
            if (o0, o1) != (0, win.out_size(h_in)):
                raise MobileNetError("a squeeze-excite block cannot run on a band of rows")
            if len(self.groups) == 1:  # nothing to split: one pass
                d = self._inner(x, a, h_in, o0, o1, 0, self.exp_channels)
                d.mul_(self._excite(d.mean((0, 1))))
                acc.addmm_(d.view(-1, self.exp_channels), self.w_project)
                return out
            gate = self._gate(x, h_in)
        for c0, c1 in self.groups:
            d = self._inner(x, a, h_in, o0, o1, c0, c1)
            if gate is not None:
                d.mul_(gate[c0:c1])
            acc.addmm_(d.view(-1, c1 - c0), self.w_project[c0:c1])  # pw-linear: += B_i d
            del d
        return out

    def plan(self, ledger: _Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
        """Replay :meth:`run` on ``ledger`` (vectors of one value per channel left out)."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        w_out = win.out_size(w_in)
        whole = (lo, hi, o0, o1) == (0, h_in, 0, win.out_size(h_in))
        rows = hi - lo + (0 if whole else top + bottom)
        result = 0 if out else ledger.alloc(4 * self.out_channels * (o1 - o0) * w_out)
        passes = 2 if self.se is not None and len(self.groups) > 1 else 1
        for _ in range(passes):
            for c0, c1 in self.groups:
                e = ledger.alloc(4 * (c1 - c0) * rows * w_in)
                d = ledger.alloc(4 * (c1 - c0) * (o1 - o0) * w_out)
                ledger.free(e)
                ledger.free(d)
        return result


def _channels_last(weight: Tensor) -> Tensor:
    """A conv weight in the layout that makes the conv's output channels_last too."""
    return weight.detach().clone(memory_format=torch.channels_last)


def _bias(conv: nn.Conv2d) -> Tensor:
    if conv.bias is None:
        return conv.weight.new_zeros(conv.out_channels)
    return conv.bias.detach().clone()


class _Segment(nn.Module):
    """Consecutive layers run band by band: only the last layer's output is whole."""

    def __init__(self, layers: Sequence[_Stem | _Block], band_rows: int | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.band_rows = band_rows if len(layers) > 1 else None

    def sizes(self, n: int) -> list[int]:
        """The height (or width) of the segment's input and of every layer's output."""
        out = [n]
        for layer in self.layers:
            out.append(layer.window.out_size(out[-1]))
        return out

    def bands(self, h: int) -> list[list[tuple[int, int]]]:
        """For each band, the output rows ``[o0, o1)`` each layer computes."""
        heights = self.sizes(h)
        rows = self.band_rows or heights[-1]
        bands = []
        for start in range(0, heights[-1], rows):
            ranges = [(start, min(start + rows, heights[-1]))]
            for layer, h_in in zip(self.layers[:0:-1], heights[-2:0:-1], strict=True):
                ranges.append(layer.rows_needed(*ranges[-1], h_in))
            bands.append(ranges[::-1])
        return bands

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        heights, widths = self.sizes(h), self.sizes(w)
        bands = self.bands(h)
        result = None
        if len(bands) > 1:
            result = x.new_empty(heights[-1], widths[-1], self.layers[-1].out_channels)
        for ranges in bands:
            y, a = x, 0
            for i, (layer, h_in, (o0, o1)) in enumerate(
                zip(self.layers, heights[:-1], ranges, strict=True)
            ):
                last = i == len(self.layers) - 1
                out = result[o0:o1] if last and result is not None else None
                y, a = layer.run(y, a, h_in, o0, o1, out), o0
            if result is None:
                return y
        assert result is not None
        return result

    def plan(self, ledger: _Ledger, h: int, w: int) -> tuple[int, int, int]:
        """Replay :meth:`forward`; returns the bytes of its output, and its height and width."""
        heights, widths = self.sizes(h), self.sizes(w)
        bands = self.bands(h)
        tiled = len(bands) > 1
        result = 0
        if tiled:
            result = ledger.alloc(4 * self.layers[-1].out_channels * heights[-1] * widths[-1])
        for ranges in bands:
            prev = 0
            for i, (layer, h_in, w_in, (o0, o1)) in enumerate(
                zip(self.layers, heights[:-1], widths[:-1], ranges, strict=True)
            ):
                y = layer.plan(ledger, h_in, w_in, o0, o1, tiled and i == len(self.layers) - 1)
                ledger.free(prev)
                prev = y
            if not tiled:
                result = prev
        return result, heights[-1], widths[-1]


class _Head(nn.Module):
    """The last 1x1 conv fused with the global average pool, then the classifier.

    The conv runs in channel groups no wider than its input, each pooled at once, so its
    output map (1280 x 32 x 32 for V2 at 1024x1024) never exists whole.
    """

    def __init__(self, model: nn.Module, last: nn.Module) -> None:
        super().__init__()
        conv = getattr(last, "conv", None)
        if (
            not isinstance(last, ConvBNAct)
            or conv.kernel_size != (1, 1)
            or conv.stride != (1, 1)
            or conv.groups != 1
        ):
            raise MobileNetError("the last feature layer must be a 1x1 conv")
        self.act = _activation(last.act)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("bias", _bias(conv))
        self.groups = _groups(conv.out_channels, math.ceil(conv.out_channels / conv.in_channels))
        self.pre_logits = model.pre_logits
        self.classifier = model.classifier  # dropout is the identity at inference
        self.out_features = conv.out_channels
        for layer in (model.pre_logits, model.classifier):
            if isinstance(layer, nn.Linear):
                self.out_features = layer.out_features
            elif hasattr(layer, "fc"):
                self.out_features = layer.fc.out_features

    def forward(self, x: Tensor) -> Tensor:
        flat = x.view(-1, x.shape[2])
        pooled = x.new_empty(1, self.out_channels)
        for c0, c1 in self.groups:
            y = torch.addmm(self.bias[c0:c1], flat, self.weight[:, c0:c1])
            _act_(self.act, y)
            torch.mean(y, 0, out=pooled[0, c0:c1])
            del y
        return self.classifier(self.pre_logits(pooled))[0]

    def plan(self, ledger: _Ledger, hw: int) -> None:
        c = max(c1 - c0 for c0, c1 in self.groups)
        ledger.free(ledger.alloc(4 * c * hw))


# --------------------------------------------------------------------------- executor


class MemoryEfficientMobileNet(nn.Module):
    """A MobileNet's inference computed as V2 Section 5.1 describes (see the module doc).

    Built by :func:`memory_efficient`; gives the outputs of the model it was built from
    (in eval mode), up to float rounding.
    """

    def __init__(
        self, model: nn.Module, splits: int, band_rows: int | None = DEFAULT_BAND_ROWS
    ) -> None:
        super().__init__()
        features = list(getattr(model, "features", []))
        blocks = [layer for layer in features if isinstance(layer, InvertedResidual)]
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        if not blocks:
            raise MobileNetError(
                f"{name} has no inverted residual blocks: the memory-efficient executor "
                "(V2 Section 5.1) needs a V2 or V3 model"
            )
        if not isinstance(splits, int) or splits <= 0:
            raise MobileNetError(f"splits must be a positive integer, got {splits!r}")
        smallest = min(block.dw.conv.in_channels for block in blocks)
        if splits > smallest:
            raise MobileNetError(
                f"splits={splits} is more than the {smallest} channels of {name}'s smallest "
                "expansion: every group needs at least one channel"
            )
        if band_rows is not None and band_rows <= 0:
            raise MobileNetError(f"band_rows must be a positive integer, got {band_rows!r}")
        folded = prepare_for_inference(model, channels_last=False)
        stem, *body, last = folded.features
        if not isinstance(stem, ConvBNAct):
            raise MobileNetError(f"{name}'s first layer must be a conv, not {type(stem).__name__}")
        layers: list[_Stem | _Block] = [_Stem(stem)]
        for layer in body:
            if not isinstance(layer, InvertedResidual):
                raise MobileNetError(f"unsupported layer {type(layer).__name__} in {name}")
            layers.append(_Block(layer, splits))
        # The leading layers at output stride < TILE_STRIDE, and the first block to reach it,
        # form the tiled segment (it stops before any squeeze-excite: SE needs whole maps).
        stride, tiled = 1, 0
        for layer in layers:
            if stride >= TILE_STRIDE or (isinstance(layer, _Block) and layer.se is not None):
                break
            stride *= layer.window.stride
            tiled += 1
        segments = [_Segment(layers[:tiled], band_rows)] if tiled else []
        segments += [_Segment([layer], None) for layer in layers[tiled:]]
        self.segments = nn.ModuleList(segments)
        self.head = _Head(folded, last)
        self.splits = splits
        self.band_rows = band_rows
        self.num_classes = getattr(folded, "num_classes", None)

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise MobileNetError(f"expected a batch of images (N, C, H, W), got {tuple(x.shape)}")
        logits: Tensor | None = None
        for i in range(x.shape[0]):  # one image at a time: its tensors only
            y, h, w = x[i], x.shape[2], x.shape[3]
            for segment in self.segments:
                y = segment(y, h, w)
                h, w = y.shape[0], y.shape[1]
            out = self.head(y)
            del y
            if logits is None:
                logits = out.new_empty(x.shape[0], *out.shape)
            logits[i] = out
            del out
        assert logits is not None
        return logits

    def analytic_peak(self, resolution: int, batch: int = 1) -> int:
        """Peak live activation bytes (fp32) of :meth:`forward`, from the shapes alone.

        A batch is processed one image at a time: from the second image on, the logits
        of the batch are alive too. Tensors of one value per channel (squeeze-excite's,
        the pooled features) are left out: a few KiB against MiBs.
        """
        ledger = _Ledger(4 * batch * self.head.out_features if batch > 1 else 0)
        h = w = resolution
        prev = 0
        for segment in self.segments:
            y, h, w = segment.plan(ledger, h, w)
            ledger.free(prev)
            prev = y
        self.head.plan(ledger, h * w)
        return ledger.peak

    def paper_bound(self, resolution: int, batch: int = 1) -> int:
        """The largest ``|input| + |output|`` of any operation (V2 Section 5.1), in bytes at
        fp32: the stem, each block as one operation, the last conv, the classifier."""
        h = w = resolution
        c = 3
        bound = 0
        for segment in self.segments:
            for layer in segment.layers:
                ho, wo = layer.window.out_size(h), layer.window.out_size(w)
                bound = max(bound, c * h * w + layer.out_channels * ho * wo)
                c, h, w = layer.out_channels, ho, wo
        bound = max(bound, c * h * w + self.head.out_channels * h * w)
        return 4 * batch * bound


def memory_efficient(
    model: nn.Module, splits: int = 4, band_rows: int | None = DEFAULT_BAND_ROWS
) -> MemoryEfficientMobileNet:
    """The memory-efficient executor of V2 Section 5.1 for an inverted-residual network.

    ``splits`` is the paper's t: the number of channel groups each block's expansion is
    computed in. ``band_rows`` is the height, in output rows, of the bands the leading
    high-resolution layers are tiled into (``None``: no tiling). The model is copied and
    its BatchNorm folded; it is left as it is.

    >>> net = memory_efficient(create_model("mobilenet_v2"), splits=4)
    >>> logits = net(torch.randn(1, 3, 224, 224))  # model.eval()(x), up to rounding
    """
    return MemoryEfficientMobileNet(model, splits, band_rows)


# --------------------------------------------------------------------------- measurement


class PeakMemory(TorchDispatchMode):
    """Observe the activation memory a computation really allocates.

    Every operator's output storage that is new is counted when it is made and uncounted
    when its finaliser runs (when the storage itself is freed, views included); ``peak``
    is the largest total alive at once. Storages alive before entering (the input, the
    weights) are not counted, nor are their views.
    """

    def __init__(self, exclude: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._sizes or key in self._excluded:
            return
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)


def measure_peak(fn: Callable[..., Any], *inputs: Tensor, module: nn.Module | None = None) -> int:
    """Peak bytes of the storages allocated while ``fn(*inputs)`` runs, its result included,
    the inputs and ``module``'s parameters and buffers excluded."""
    exclude = list(inputs)
    if module is not None:
        exclude += [*module.parameters(), *module.buffers()]
    with PeakMemory(exclude) as tracker:
        out = fn(*inputs)
        del out
    return tracker.peak


# --------------------------------------------------------------------------- report


@dataclass(frozen=True)
class MemoryReport:
    """What ``mobilenet memory`` prints: both forwards' memory and time (bytes at fp32)."""

    model: str
    width_mult: float
    resolution: int
    batch: int
    splits: int
    band_rows: int | None
    threads: int
    analytic: dict[str, int]
    measured: dict[str, int]
    time_ms: dict[str, float]
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_report(
    name: str,
    width_mult: float = 1.0,
    splits: int = 4,
    resolution: int = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> MemoryReport:
    """Compare the standard forward with the memory-efficient one on random weights.

    The standard forward is the model with BatchNorm folded, NCHW, in inference mode
    (``prepare_for_inference(model, channels_last=False)``). Times are medians of
    ``repeats`` calls each, the two forwards taking turns, on the current thread count.
    """
    from .cost import check_resolution, cost
    from .models import create_model

    check_resolution(resolution)
    if batch <= 0:
        raise MobileNetError(f"batch must be a positive integer, got {batch!r}")
    model = create_model(name, width_mult=width_mult).eval()
    efficient = memory_efficient(model, splits, band_rows)
    standard = prepare_for_inference(model, channels_last=False)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))

    def run_standard(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return standard(images)

    analytic = {
        "standard_bytes": cost(standard, resolution).peak_activation_bytes * batch,
        "efficient_bytes": efficient.analytic_peak(resolution, batch),
        "paper_bound_bytes": efficient.paper_bound(resolution, batch),
    }
    measured = {
        "standard_bytes": measure_peak(run_standard, x, module=standard),
        "efficient_bytes": measure_peak(efficient, x, module=efficient),
    }
    diff = (run_standard(x) - efficient(x)).abs().max().item()
    times: dict[str, list[float]] = {"standard": [], "efficient": []}
    for _ in range(repeats):
        for key, fn in (("standard", run_standard), ("efficient", efficient)):
            start = time.perf_counter()
            fn(x)
            times[key].append(1000 * (time.perf_counter() - start))
    return MemoryReport(
        model=name,
        width_mult=width_mult,
        resolution=resolution,
        batch=batch,
        splits=splits,
        band_rows=band_rows,
        threads=torch.get_num_threads(),
        analytic=analytic,
        measured=measured,
        time_ms={k: statistics.median(v) for k, v in times.items()},
        max_abs_diff=diff,
    )


def format_report(report: MemoryReport) -> str:
    """``mobilenet memory``'s table."""

    def mib(nbytes: float) -> str:
        return f"{nbytes / 2**20:.2f} MiB"

    a, m, t = report.analytic, report.measured, report.time_ms
    tiling = f"bands of {report.band_rows} rows" if report.band_rows else "no tiling"
    threads = f"{report.threads} thread{'s' if report.threads > 1 else ''}"
    rows = [
        ("", "standard", "memory-efficient", "ratio"),
        (
            "analytic peak (fp32)",
            mib(a["standard_bytes"]),
            mib(a["efficient_bytes"]),
            f"{a['efficient_bytes'] / a['standard_bytes']:.3f}",
        ),
        (
            "measured peak",
            mib(m["standard_bytes"]),
            mib(m["efficient_bytes"]),
            f"{m['efficient_bytes'] / m['standard_bytes']:.3f}",
        ),
        (
            "time (median)",
            f"{t['standard']:.1f} ms",
            f"{t['efficient']:.1f} ms",
            f"{t['efficient'] / t['standard']:.2f}",
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{report.model} (width {report.width_mult:g}) at {report.resolution}x"
        f"{report.resolution}, batch {report.batch}, t={report.splits}, {tiling}, {threads}"
    ]
    for r in rows:
        right = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *right]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        f"paper's bound, largest |input| + |output| of an operation: {mib(a['paper_bound_bytes'])}"
    )
    lines.append(f"outputs: max abs difference {report.max_abs_diff:.1e}")
    return "\n".join(lines)
