"""The executor's backbone: the stem and the inverted residual blocks as segments.

A :class:`_Segment` is consecutive layers run band by band (only its last layer's output
is ever whole). :func:`backbone_segments` splits a folded network's layers into the tiled
segment of the leading high-resolution layers and one untiled segment per later layer,
cutting after any layer whose output a head reads (a segmentation model's taps), so that
output exists whole. Shared by the classifier's executor and the segmenter's.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from torch import Tensor, nn

from ..blocks import FusedInvertedBottleneck, InvertedResidual, UniversalInvertedBottleneck
from ..errors import MobileNetError
from ..layers import ConvBNAct
from .forms import FormOptions, executor_form
from .ops import GroupedInvertedResidual, Ledger, Stem

__all__ = ["DEFAULT_BAND_ROWS", "TILE_STRIDE", "backbone_segments", "check_arguments"]

TILE_STRIDE = 8  # the tiled segment ends with the first block reaching this output stride
DEFAULT_BAND_ROWS = 16


class _Segment(nn.Module):
    """Consecutive layers run band by band: only the last layer's output is whole."""

    def __init__(self, layers: Sequence[nn.Module], band_rows: int | None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.band_rows = band_rows if len(layers) > 1 else None

    @property
    def out_channels(self) -> int:
        return self.layers[-1].out_channels

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

    def plan(self, ledger: Ledger, h: int, w: int) -> tuple[int, int, int]:
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

    def bound(self, c: int, h: int, w: int) -> tuple[int, int, int, int]:
        """The largest ``|input| + |output|`` (elements) of the segment's layers, and the
        channels, height and width of its output (V2 Section 5.1's bound)."""
        bound = 0
        for layer in self.layers:
            ho, wo = layer.window.out_size(h), layer.window.out_size(w)
            bound = max(bound, c * h * w + layer.out_channels * ho * wo)
            c, h, w = layer.out_channels, ho, wo
        return bound, c, h, w


def check_arguments(
    features: Sequence[nn.Module], name: str, splits: int, band_rows: int | None
) -> None:
    """Refuse layers without inverted residual blocks (V2/V3's, V4's UIB and fused IB), and
    ``splits`` or ``band_rows`` out of range (``splits`` at most the channels of the
    smallest expansion)."""
    expansions = [_expansion(layer) for layer in features]
    if not any(expansions):
        raise MobileNetError(
            f"{name} has no inverted residual blocks: the memory-efficient executor "
            "(V2 Section 5.1) needs a V2, V3 or V4 model"
        )
    if not isinstance(splits, int) or isinstance(splits, bool) or splits <= 0:
        raise MobileNetError(f"splits must be a positive integer, got {splits!r}")
    smallest = min(c for c in expansions if c)
    if splits > smallest:
        raise MobileNetError(
            f"splits={splits} is more than the {smallest} channels of {name}'s smallest "
            "expansion: every group needs at least one channel"
        )
    if band_rows is not None and (
        not isinstance(band_rows, int) or isinstance(band_rows, bool) or band_rows <= 0
    ):
        raise MobileNetError(f"band_rows must be a positive integer, got {band_rows!r}")


def _expansion(layer: nn.Module) -> int:
    """The channels of a block's expansion (0 for a layer that is no inverted bottleneck)."""
    if isinstance(layer, InvertedResidual):
        return layer.dw.conv.in_channels
    if isinstance(layer, UniversalInvertedBottleneck | FusedInvertedBottleneck):
        return layer.expand.conv.out_channels
    return 0


def backbone_segments(
    stem: nn.Module,
    body: Sequence[nn.Module],
    name: str,
    splits: int,
    band_rows: int | None,
    cuts: Collection[int] = (),
) -> list[_Segment]:
    """The segments of the folded stem and blocks: the tiled segment of the leading layers,
    then one untiled segment per layer. ``cuts``: indices (the stem is 0) of layers whose
    output must exist whole, which end the tiled segment if they fall inside it."""
    layers = _layers(stem, body, name, splits)
    # The leading layers at output stride < TILE_STRIDE, and the first block to reach it,
    # form the tiled segment (it stops before any squeeze-excite: SE needs whole maps; and
    # before V4's UIB and Mobile MQA blocks, which run whole).
    stride, tiled = 1, 0
    for layer in layers:
        whole = isinstance(layer, GroupedInvertedResidual) and layer.se is not None
        if stride >= TILE_STRIDE or whole or not getattr(layer, "tiles", True):
            break
        stride *= layer.window.stride
        tiled += 1
    tiled = min([tiled, *(cut + 1 for cut in cuts)])
    segments = [_Segment(layers[:tiled], band_rows)] if tiled else []
    segments += [_Segment([layer], None) for layer in layers[tiled:]]
    return segments


def _layers(stem: nn.Module, body: Sequence[nn.Module], name: str, splits: int) -> list[nn.Module]:
    """The executor's layers for the folded model's stem and blocks: the stem's, then
    each block's form from the table (:data:`~mobilenet.memory.forms.EXECUTOR_FORMS`)."""
    if not isinstance(stem, ConvBNAct):
        raise MobileNetError(f"{name}'s first layer must be a conv, not {type(stem).__name__}")
    options = FormOptions(splits=splits)
    return [Stem(stem), *(executor_form(layer, options, name) for layer in body)]
