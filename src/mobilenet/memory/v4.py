"""The executor's layers for MobileNetV4 (Qin et al., ECCV 2024): V2 Section 5.1 applied
to V4's blocks.

* :class:`GroupedUIB`, the Universal Inverted Bottleneck (V4 Section 4.1, Figure 4): the
  starting depthwise conv (linear) runs once on the thin input, whole; then, as in V2's
  executor, the expansion is computed in ``t`` channel groups, each group's slice of the
  expanding 1x1 conv, its slice of the middle depthwise conv (where the block has one)
  and its slice of the projection, accumulated in place into one output buffer that
  starts as the projection's bias plus the shortcut. A hybrid model's layer scale is a
  per-channel factor on the projection's output: it is folded into the projection's
  weights and bias. Live at once: the block's input and output, the starting depthwise
  conv's output (as thin as the input; the output's size where the conv is strided) and
  one group of the expansion (``exp / t`` channels, before and after the middle
  depthwise conv). UIBs run on whole maps.
* :class:`FullConv`, a full conv + activation (Conv-S's first stages, plain Conv2D rows) or a
  fused IB (its full kxk conv expanding, a linear 1x1 projecting): the fused IB's
  expansion is computed in ``t`` channel groups too (each group's slice of the full conv,
  then of the projection). Both run on bands of rows, so they join the stem in the tiled
  segment of the leading high-resolution layers (:mod:`mobilenet.memory.backbone`).
* :class:`WholeMQA`, a Mobile MQA block (V4 Section 4.2), runs whole, as the folded module:
  its maps are at output stride 16 and 32, where they are small; its peak is the block's
  input and output plus its attention tensors (queries, keys, values and the heads'
  output, all live at once here as an upper estimate).

Each is its block's executor form in the table of :mod:`~mobilenet.memory.forms`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import FusedInvertedBottleneck, MobileMQA, UniversalInvertedBottleneck
from ..errors import MobileNetError
from ..layers import ConvBNAct, LayerScale
from .ops import (
    ConvWindow,
    Ledger,
    activate_,
    activation_kind,
    as_hwc,
    as_nchw,
    channel_groups,
    channels_last_weight,
    conv_bias,
    conv_window,
    padded_buffer,
)

__all__ = ["FullConv", "GroupedUIB", "WholeMQA"]


def _linear_project(layer: ConvBNAct, scale: nn.Module) -> tuple[Tensor, Tensor]:
    """A linear 1x1 projection as ``(n, k')`` weights and its bias, a layer scale folded in."""
    conv = layer.conv
    if activation_kind(layer.act) != "identity":
        raise MobileNetError("the projection of an inverted bottleneck must be linear")
    weight, bias = conv.weight.detach().flatten(1).t().contiguous(), conv_bias(conv)
    if isinstance(scale, LayerScale):  # (x W + b) * g = x (W g) + b g
        gamma = scale.gamma.detach()
        weight, bias = weight * gamma, bias * gamma
    elif not isinstance(scale, nn.Identity):
        raise MobileNetError(f"unsupported layer scale {type(scale).__name__}")
    return weight, bias


class FullConv(nn.Module):
    """A full conv + activation on an (H, W, C) map, for a band of output rows; for a fused
    IB, its expansion in channel groups, each projected and accumulated at once."""

    def __init__(self, layer: ConvBNAct | FusedInvertedBottleneck, splits: int) -> None:
        super().__init__()
        fused = isinstance(layer, FusedInvertedBottleneck)
        full = layer.expand if fused else layer
        conv = full.conv
        if conv.groups != 1:
            raise MobileNetError(f"expected a full conv, got {conv}")
        self.window = conv_window(conv)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.act = activation_kind(full.act)
        self.register_buffer("weight", channels_last_weight(conv.weight))
        self.register_buffer("bias", conv_bias(conv))
        self.residual = False
        self.groups = [(0, conv.out_channels)]
        if fused:
            weight, bias = _linear_project(layer.project, nn.Identity())
            self.register_buffer("w_project", weight)
            self.register_buffer("b_project", bias)
            self.residual = layer.add is not None
            self.groups = channel_groups(conv.out_channels, splits)
            self.out_channels = layer.project.conv.out_channels
        self.fused = fused

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        return self.window.rows_needed(o0, o1, h_in)[:2]

    def _source(self, x: Tensor, a: int, h_in: int, o0: int, o1: int) -> tuple[Tensor, tuple]:
        """The input rows output rows ``[o0, o1)`` read (NCHW view), and the conv padding:
        the whole map as it is, or a band, copied with its zero rows where it touches the
        border."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        if (lo, hi, o0, o1) == (0, h_in, 0, win.out_size(h_in)):
            return as_nchw(x[lo - a : hi - a]), (win.padding, win.padding)
        if top == bottom == 0:
            return as_nchw(x[lo - a : hi - a]), (0, win.padding)
        src = padded_buffer(hi - lo, x.shape[1], x.shape[2], top, bottom, x)
        src[top : top + hi - lo].copy_(x[lo - a : hi - a])
        return as_nchw(src), (0, win.padding)

    def _conv(self, src: Tensor, pad: tuple, c0: int, c1: int) -> Tensor:
        win = self.window
        y = F.conv2d(src, self.weight[c0:c1], self.bias[c0:c1], win.stride, pad, win.dilation)
        return activate_(self.act, as_hwc(y))

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        """Output rows ``[o0, o1)`` from ``x``, which holds input rows ``[a, a + len)``."""
        src, pad = self._source(x, a, h_in, o0, o1)
        if not self.fused:
            y = self._conv(src, pad, 0, self.out_channels)
            del src
            if out is not None:
                out.copy_(y)
                return out
            return y
        w_out = self.window.out_size(x.shape[1])
        if out is None:
            out = x.new_empty(o1 - o0, w_out, self.out_channels)
        if self.residual:  # stride 1: output rows are input rows
            torch.add(x[o0 - a : o1 - a], self.b_project, out=out)
        else:
            out.copy_(self.b_project.expand_as(out))
        acc = out.view(-1, self.out_channels)
        for c0, c1 in self.groups:
            e = self._conv(src, pad, c0, c1)  # the full conv's slice: A_i x
            acc.addmm_(e.view(-1, c1 - c0), self.w_project[c0:c1])  # += B_i A_i x
            del e
        return out

    def plan(self, ledger: Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
        """Replay :meth:`run` on ``ledger``; returns the bytes of the output it leaves."""
        win = self.window
        lo, hi, top, bottom = win.rows_needed(o0, o1, h_in)
        whole = (lo, hi, o0, o1) == (0, h_in, 0, win.out_size(h_in))
        copied = not whole and top + bottom > 0
        src = ledger.alloc(4 * self.in_channels * (top + hi - lo + bottom) * w_in) if copied else 0
        pixels = (o1 - o0) * win.out_size(w_in)
        if not self.fused:
            y = ledger.alloc(4 * self.out_channels * pixels)
            ledger.free(src)
            if out:
                ledger.free(y)
                return 0
            return y
        result = 0 if out else ledger.alloc(4 * self.out_channels * pixels)
        for c0, c1 in self.groups:
            ledger.free(ledger.alloc(4 * (c1 - c0) * pixels))
        ledger.free(src)
        return result


class GroupedUIB(nn.Module):
    """A Universal Inverted Bottleneck, whole map, its expansion in channel groups."""

    tiles = False  # whole maps only: it never joins the tiled segment

    def __init__(self, block: UniversalInvertedBottleneck, splits: int) -> None:
        super().__init__()
        self.start: ConvWindow | None = None
        self.mid: ConvWindow | None = None
        self.in_channels = block.expand.conv.in_channels
        self.exp_channels = block.expand.conv.out_channels
        if isinstance(block.dw_start, ConvBNAct):
            self.start = conv_window(block.dw_start.conv)
            if activation_kind(block.dw_start.act) != "identity":
                raise MobileNetError("the starting depthwise conv of a UIB must be linear")
            self.register_buffer("w_start", channels_last_weight(block.dw_start.conv.weight))
            self.register_buffer("b_start", conv_bias(block.dw_start.conv))
        self.expand_act = activation_kind(block.expand.act)
        expand = block.expand.conv
        self.register_buffer("w_expand", expand.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("b_expand", conv_bias(expand))
        if isinstance(block.dw_mid, ConvBNAct):
            self.mid = conv_window(block.dw_mid.conv)
            self.mid_act = activation_kind(block.dw_mid.act)
            self.register_buffer("w_mid", channels_last_weight(block.dw_mid.conv.weight))
            self.register_buffer("b_mid", conv_bias(block.dw_mid.conv))
        weight, bias = _linear_project(block.project, block.layer_scale)
        self.register_buffer("w_project", weight)
        self.register_buffer("b_project", bias)
        self.out_channels = weight.shape[1]
        self.residual = block.use_residual
        self.groups = channel_groups(self.exp_channels, splits)
        # The strided conv sets the output size (the other one keeps the map's size).
        self.window = self.mid or self.start or ConvWindow(1, 1, 0)

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        raise MobileNetError("a UIB runs on whole maps, not on bands of rows")

    def _sizes(self, h: int, w: int) -> tuple[int, int, int, int]:
        """The map's height and width after the starting conv, and at the output."""
        hs, ws = (self.start.out_size(h), self.start.out_size(w)) if self.start else (h, w)
        ho, wo = (self.mid.out_size(hs), self.mid.out_size(ws)) if self.mid else (hs, ws)
        return hs, ws, ho, wo

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        """The block's output for the whole map ``x`` (``a`` 0, ``[o0, o1)`` every row)."""
        h, w, c = x.shape
        hs, ws, ho, wo = self._sizes(h, w)
        if (a, o0, o1) != (0, 0, ho):
            raise MobileNetError("a UIB runs on whole maps, not on bands of rows")
        if out is None:
            out = x.new_empty(ho, wo, self.out_channels)
        if self.residual:
            torch.add(x, self.b_project, out=out)
        else:
            out.copy_(self.b_project.expand_as(out))
        acc = out.view(-1, self.out_channels)
        s = x
        if self.start is not None:  # dw (extra, linear): on the thin input, once
            st = self.start
            wt, bt = self.w_start, self.b_start
            y = F.conv2d(as_nchw(x), wt, bt, st.stride, st.padding, st.dilation, c)
            s = as_hwc(y)
        flat = s.view(-1, c)
        for c0, c1 in self.groups:
            e = torch.addmm(self.b_expand[c0:c1], flat, self.w_expand[:, c0:c1])  # pw: A_i
            activate_(self.expand_act, e)
            if self.mid is not None:  # dw on the group's channels
                m, n = self.mid, c1 - c0
                wt, bt = self.w_mid[c0:c1], self.b_mid[c0:c1]
                d = F.conv2d(as_nchw(e.view(hs, ws, n)), wt, bt, m.stride, m.padding, m.dilation, n)
                del e
                e = activate_(self.mid_act, as_hwc(d))
                del d
            acc.addmm_(e.view(-1, c1 - c0), self.w_project[c0:c1])  # pw-linear: += B_i
            del e
        del s, flat
        return out

    def plan(self, ledger: Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
        """Replay :meth:`run` on ``ledger``; returns the bytes of the output it leaves."""
        hs, ws, ho, wo = self._sizes(h_in, w_in)
        result = 0 if out else ledger.alloc(4 * self.out_channels * ho * wo)
        s = ledger.alloc(4 * self.in_channels * hs * ws) if self.start is not None else 0
        for c0, c1 in self.groups:
            e = ledger.alloc(4 * (c1 - c0) * hs * ws)
            if self.mid is not None:
                d = ledger.alloc(4 * (c1 - c0) * ho * wo)
                ledger.free(e)
                ledger.free(d)
            else:
                ledger.free(e)
        ledger.free(s)
        return result


class WholeMQA(nn.Module):
    """A Mobile MQA block run whole, as the folded module, on an (H, W, C) map."""

    tiles = False

    def __init__(self, block: MobileMQA) -> None:
        super().__init__()
        self.block = block
        self.window = ConvWindow(1, 1, 0)  # the block keeps the map's size
        self.in_channels = block.attn.query.in_channels
        self.out_channels = block.out_channels
        attn = block.attn
        self.q_channels = attn.heads * attn.key_dim
        self.o_channels = attn.heads * attn.value_dim
        self.kv_channels = attn.key_dim + attn.value_dim
        self.kv_stride = 1 if isinstance(attn.key_down, nn.Identity) else 2
        self.query_stride = attn.query_stride

    def rows_needed(self, o0: int, o1: int, h_in: int) -> tuple[int, int]:
        raise MobileNetError("a Mobile MQA block runs on whole maps, not on bands of rows")

    def run(self, x: Tensor, a: int, h_in: int, o0: int, o1: int, out: Tensor | None) -> Tensor:
        y = self.block(as_nchw(x))
        if out is None:
            out = x.new_empty(x.shape[0], x.shape[1], self.out_channels)
        out.copy_(y[0].permute(1, 2, 0))
        return out

    def plan(self, ledger: Ledger, h_in: int, w_in: int, o0: int, o1: int, out: bool) -> int:
        """An upper estimate: the block's input-sized tensors (the pre-norm, the residual
        branch before and after the layer scale, the sum) and the attention's tensors
        (queries and the heads' output, each with a reshaped copy, keys and values on the
        ``kv_stride``-downsampled map) all live at once, then the output copy."""
        hw = h_in * w_in
        q = -(-h_in // self.query_stride) * -(-w_in // self.query_stride)
        kv = -(-h_in // self.kv_stride) * -(-w_in // self.kv_stride)
        inner = 4 * (
            2 * self.in_channels * hw  # the pre-norm, the downsampled keys' map
            + 2 * (self.q_channels + self.o_channels) * q
            + 2 * self.kv_channels * kv
            + 3 * self.out_channels * hw  # the output projection, layer scale, sum
        )
        result = ledger.alloc(4 * self.out_channels * hw)
        ledger.free(ledger.alloc(inner))
        if out:
            ledger.free(result)
            return 0
        return result
