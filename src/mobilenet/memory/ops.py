"""The executor's layers: the stem and the inverted residual block of V2 Section 5.1, and
the operations every executor layer is made of.

:class:`GroupedInvertedResidual` computes a block as ``sum_i (A_i . N . B_i)(x)`` over the
channel groups of its expansion, for a band of output rows; :class:`Stem` computes the
first conv for a band of output rows. Each has a ``plan`` that replays its allocations on
a :class:`Ledger`, the analytic count of live bytes.

The operations, shared with V4's layers (:mod:`~mobilenet.memory.v4`) and the
segmentation heads' (:mod:`~mobilenet.memory.heads`):

* geometry: :class:`ConvWindow` (a conv along one spatial axis: the rows a band of output
  rows reads) and :func:`conv_window`; :func:`channel_groups` (the ``t`` groups of an
  expansion); :func:`height_width`;
* layout: an executor's map is ``(H, W, C)``; :func:`as_nchw` and :func:`as_hwc` view it
  as the channels_last ``(1, C, H, W)`` tensor a conv takes and back;
  :func:`channels_last_weight` and :func:`conv_bias` are a folded conv's parameters as
  the layers keep them; :func:`padded_buffer` a band with its zero padding rows;
* activations, in place: :func:`activation_kind` names a module's, :func:`activate_`
  applies it.

Which layer computes which block is the table of :mod:`~mobilenet.memory.forms`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import InvertedResidual
from ..errors import MobileNetError
from ..layers import ConvBNAct, SqueezeExcite

__all__ = [
    "ConvWindow",
    "GroupedInvertedResidual",
    "Ledger",
    "Stem",
    "activate_",
    "activation_kind",
    "as_hwc",
    "as_nchw",
    "channel_groups",
    "channels_last_weight",
    "conv_bias",
    "conv_window",
    "height_width",
    "padded_buffer",
]

# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class ConvWindow:
    """A convolution's geometry along one spatial axis.

    A dilated (atrous) kernel spans ``dilation * (kernel - 1) + 1`` rows: a band of output
    rows reads a halo of ``dilation * (kernel // 2)`` input rows on each side.
    """

    kernel: int
    stride: int
    padding: int
    dilation: int = 1

    @property
    def span(self) -> int:
        """The rows one output row reads."""
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, n: int) -> int:
        """The output rows of ``n`` input rows."""
        return (n + 2 * self.padding - self.span) // self.stride + 1

    def rows_needed(self, o0: int, o1: int, n_in: int) -> tuple[int, int, int, int]:
        """Input rows ``[lo, hi)`` that output rows ``[o0, o1)`` read, clipped to the image,
        and the zero rows above and below them that the padding supplies."""
        lo = o0 * self.stride - self.padding
        hi = (o1 - 1) * self.stride - self.padding + self.span
        return max(lo, 0), min(hi, n_in), max(-lo, 0), max(hi - n_in, 0)


def conv_window(conv: nn.Conv2d) -> ConvWindow:
    """The geometry of ``conv``, which must be square with 'same'-style padding (a band's
    halo is then the same above and below, and along both axes)."""
    if any(len(set(v)) != 1 for v in (conv.kernel_size, conv.stride, conv.dilation)):
        raise MobileNetError(f"square kernels, strides and dilations only, got {conv}")
    k, d = conv.kernel_size[0], conv.dilation[0]
    if conv.padding != (d * (k // 2),) * 2:
        raise MobileNetError(f"'same'-style padding (dilation * (kernel // 2)) only, got {conv}")
    return ConvWindow(k, conv.stride[0], conv.padding[0], d)


def activation_kind(module: nn.Module) -> str:
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
    "gelu": nn.GELU,  # MobileNetV4's hybrid models
}

_GELU_CHUNK = 1 << 14  # elements: GELU has no in-place kernel; 64 KiB temporaries


def activate_(kind: str, x: Tensor) -> Tensor:
    """Apply the activation ``kind`` (an :func:`activation_kind`) to ``x`` in place; returns
    ``x``. GELU, which has no in-place kernel, is applied a chunk at a time."""
    if kind == "relu6":  # nn.ReLU6 is hardtanh(0, 6)
        return F.hardtanh_(x, 0.0, 6.0)
    if kind == "relu":
        return x.relu_()
    if kind == "hardswish":
        return F.hardswish(x, inplace=True)
    if kind == "gelu":  # in place, a chunk at a time (x is contiguous)
        flat = x.view(-1)
        for i in range(0, flat.numel(), _GELU_CHUNK):
            chunk = flat[i : i + _GELU_CHUNK]
            chunk.copy_(F.gelu(chunk))
        return x
    return x


def channel_groups(channels: int, splits: int) -> list[tuple[int, int]]:
    """``splits`` contiguous channel ranges, sizes differing by at most one."""
    bounds = [channels * i // splits for i in range(splits + 1)]
    return list(itertools.pairwise(bounds))


def padded_buffer(
    rows: int, width: int, channels: int, top: int, bottom: int, like: Tensor
) -> Tensor:
    """An uninitialised ``(top + rows + bottom, width, channels)`` buffer, pad rows zeroed."""
    buf = like.new_empty(top + rows + bottom, width, channels)
    buf[:top].zero_()
    buf[top + rows :].zero_()
    return buf


def as_nchw(x: Tensor) -> Tensor:
    """An ``(H, W, C)`` map as the ``(1, C, H, W)`` channels_last tensor it already is."""
    return x.permute(2, 0, 1)[None]


def as_hwc(x: Tensor) -> Tensor:
    """The inverse of :func:`as_nchw` for a channels_last ``(1, C, H, W)`` tensor."""
    out = x[0].permute(1, 2, 0)
    assert out.is_contiguous(), "expected a channels_last convolution output"
    return out


def height_width(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` of a square's side or of a pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return h, w


class Ledger:
    """Replays a schedule of allocations: the analytic count of live bytes and its peak;
    ``working_peak`` leaves out what was allocated as the forward's ``output``."""

    def __init__(self, live: int = 0) -> None:
        self.live = self.peak = self.working_peak = live
        self.output = 0

    def alloc(self, nbytes: int, output: bool = False) -> int:
        self.live += nbytes
        self.output += nbytes if output else 0
        self.peak = max(self.peak, self.live)
        self.working_peak = max(self.working_peak, self.live - self.output)
        return nbytes

    def free(self, nbytes: int) -> None:
        self.live -= nbytes


# --------------------------------------------------------------------------- layers
#
# Inside the executor a feature map is an (H, W, C) tensor: a band of rows is then a
# contiguous slice, a 1x1 conv is one matrix product ((H*W, k) @ (k, n)), and the
# depthwise conv runs on channels_last data, which the CPU kernels prefer.


class Stem(nn.Module):
    """The first conv + activation, reading the (C, H, W) image for a band of output rows."""

    def __init__(self, layer: ConvBNAct) -> None:
        super().__init__()
        conv = layer.conv
        self.window = conv_window(conv)
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.act = activation_kind(layer.act)
        self.register_buffer("weight", channels_last_weight(conv.weight))
        self.register_buffer("bias", conv_bias(conv))

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        return self.window.rows_needed(o0, o1, h_in)[:2]

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        """Output rows ``[o0, o1)`` of the image ``x`` (``a`` is 0: it is whole)."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        # The image's rows, as (H, W, C) with the padding rows: 3 channels, a small copy.
        src = padded_buffer(hi - lo, x.shape[2], x.shape[0], top, bottom, x)
        src[top : top + hi - lo].copy_(x[:, lo - a : hi - a].permute(1, 2, 0))
        y = F.conv2d(
            as_nchw(src),
            self.weight,
            self.bias,
            win.stride,
            (0, win.padding),
            win.dilation,
            self.groups,
        )
        del src
        y = activate_(self.act, as_hwc(y))
        if out is not None:
            out.copy_(y)
            return out
        return y

    def plan(self, ledger: Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
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


class GroupedInvertedResidual(nn.Module):
    """An inverted residual computed over ``splits`` channel groups of its expansion."""

    def __init__(self, block: InvertedResidual, splits: int) -> None:
        super().__init__()
        dw = block.dw.conv
        self.window = conv_window(dw)
        self.exp_channels = dw.in_channels
        self.out_channels = block.project.conv.out_channels
        self.residual = block.use_residual
        self.has_expand = isinstance(block.expand, ConvBNAct)
        self.groups = channel_groups(self.exp_channels, splits)
        if self.has_expand:
            self.expand_act = activation_kind(block.expand.act)
            expand = block.expand.conv
            # (k, n): A_i is a slice of its columns
            self.register_buffer("w_expand", expand.weight.detach().flatten(1).t().contiguous())
            self.register_buffer("b_expand", conv_bias(expand))
        self.dw_act = activation_kind(block.dw.act)
        self.register_buffer("w_dw", channels_last_weight(dw.weight))
        self.register_buffer("b_dw", conv_bias(dw))
        project = block.project.conv
        if activation_kind(block.project.act) != "identity":
            raise MobileNetError("the projection of an inverted residual must be linear")
        # (n, k'): B_i is a slice of its rows
        self.register_buffer("w_project", project.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("b_project", conv_bias(project))
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
        e = padded_buffer(rows, width, c1 - c0, top, bottom, x)
        if self.has_expand:  # pw: A_i x, written straight into the padded buffer
            torch.addmm(
                self.b_expand[c0:c1],
                x[lo - a : hi - a].view(rows * width, x.shape[2]),
                self.w_expand[:, c0:c1],
                out=e[top : top + rows].view(rows * width, c1 - c0),
            )
            activate_(self.expand_act, e)
        else:
            e[top : top + rows].copy_(x[lo - a : hi - a, :, c0:c1])
        # dw (atrous where the block is dilated)
        d = F.conv2d(
            as_nchw(e), self.w_dw[c0:c1], self.b_dw[c0:c1], win.stride, pad, win.dilation, c1 - c0
        )
        del e
        return activate_(self.dw_act, as_hwc(d))

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

    def plan(self, ledger: Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
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


def channels_last_weight(weight: Tensor) -> Tensor:
    """A conv weight in the layout that makes the conv's output channels_last too."""
    return weight.detach().clone(memory_format=torch.channels_last)


def conv_bias(conv: nn.Conv2d) -> Tensor:
    """A copy of the conv's bias; zeros where it has none (the layers always add one)."""
    if conv.bias is None:
        return conv.weight.new_zeros(conv.out_channels)
    return conv.bias.detach().clone()
