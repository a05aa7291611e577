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

How much memory the executor saves, and what it costs in time, is reported by
:mod:`mobilenet.memory.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..blocks import InvertedResidual
from ..errors import MobileNetError
from ..export.prepare import prepare_for_inference
from ..layers import ConvBNAct
from .ops import _act_, _activation, _bias, _Block, _groups, _Ledger, _Stem

__all__ = ["DEFAULT_BAND_ROWS", "TILE_STRIDE", "MemoryEfficientMobileNet", "memory_efficient"]

TILE_STRIDE = 8  # the tiled segment ends with the first block reaching this output stride
DEFAULT_BAND_ROWS = 16


# --------------------------------------------------------------------------- segments


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
        name = getattr(getattr(model, "config", None), "name", type(model).__name__)
        _check_arguments(model, name, splits, band_rows)
        folded = prepare_for_inference(model, channels_last=False)
        stem, *body, last = folded.features
        self.segments = nn.ModuleList(_segments(_layers(stem, body, name, splits), band_rows))
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


def _check_arguments(model: nn.Module, name: str, splits: int, band_rows: int | None) -> None:
    """Refuse a model without inverted residual blocks, and ``splits`` or ``band_rows`` out
    of range (``splits`` at most the channels of the smallest expansion)."""
    features = list(getattr(model, "features", []))
    blocks = [layer for layer in features if isinstance(layer, InvertedResidual)]
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


def _layers(
    stem: nn.Module, body: Sequence[nn.Module], name: str, splits: int
) -> list[_Stem | _Block]:
    """The executor's layers for the folded model's features, the last conv excepted."""
    if not isinstance(stem, ConvBNAct):
        raise MobileNetError(f"{name}'s first layer must be a conv, not {type(stem).__name__}")
    layers: list[_Stem | _Block] = [_Stem(stem)]
    for layer in body:
        if not isinstance(layer, InvertedResidual):
            raise MobileNetError(f"unsupported layer {type(layer).__name__} in {name}")
        layers.append(_Block(layer, splits))
    return layers


def _segments(layers: list[_Stem | _Block], band_rows: int | None) -> list[_Segment]:
    """The tiled segment of the leading layers, then one untiled segment per layer."""
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
    return segments


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
