"""Memory-efficient inference for the segmentation models (LR-ASPP, DeepLabv3).

The backbone runs as in the classifier's executor (V2 Section 5.1: every inverted
residual over ``t`` channel groups of its expansion, the leading high-resolution layers
in bands of rows), its atrous depthwise convs included: a band of a dilated conv reads a
halo of ``dilation * (k // 2)`` rows. The segment ending at the ``"low"`` tap (the first
layer at output stride 8) is kept for the head; the head runs on (H, W, C) maps at output
stride 16 or 8 (:mod:`mobilenet.memory.heads`); the logits are upsampled to the input size
band by band, straight into the output.

What it returns is ``output``:

* ``"logits"``: ``[N, classes, H, W]`` float32 logits (and ``"aux"`` when the model has
  the auxiliary head), as the model. At 1024x2048 with 21 classes they are 168 MiB, more
  than everything else the executor holds together.
* ``"labels"``: what a phone shows, the label map ``[N, H, W]``, each pixel the arg-max
  of its logits (the first of equal ones, as :func:`torch.argmax`). The upsampled logits
  exist one band of rows at a time, arg-maxed into the map; the full-resolution logits
  never do. The map's dtype is the smallest that holds the class indices
  (:func:`labels_dtype`: uint8 up to 256 classes, so 2 MiB at 1024x2048). The banded
  upsampling gives every pixel the logits the whole-image resize gives it, bit for bit
  (:func:`~mobilenet.memory.heads.resize_rows`): the map is the arg-max of the
  executor's logits exactly, and equals the standard forward's arg-max wherever its two
  largest logits are further apart than the float rounding by which the executor's
  logits differ from it (about 1e-6 of their scale). Logits that are NaN or infinite
  are refused: no map is made of them. ``forward(x, size)`` makes the map at another
  ``size``: the logits at the input's size resized to it, band by band, as ``mobilenet
  predict`` maps a resized image back to its own size. The auxiliary head is not run.

The output is allocated once the first image's head has run, so that the backbone's peak
and the output never meet at batch 1. :func:`~mobilenet.memory.measure_peak` can leave it
out (``without_result``), and :meth:`MemoryEfficientSegmenter.analytic_peak` reports the
peak with and without it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..errors import MobileNetError
from ..export.prepare import prepare_for_inference
from ..layers import ConvBNAct
from .backbone import backbone_segments, check_arguments
from .forms import FormOptions, executor_form
from .heads import (
    plan_resize_rows,
    register_head_forms,
    resize_rows,
    row_bands,
    source_span,
    upsample_rows,
)
from .ops import Ledger, height_width

__all__ = ["OUTPUTS", "MemoryEfficientSegmenter", "labels_dtype"]

Outputs = dict[str, Tensor]
Size = tuple[int, int]
OUTPUTS = ("logits", "labels")
NON_FINITE = "the model outputs NaN or infinite values (damaged or overflowing weights)"


def labels_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds the class indices ``0 .. num_classes - 1``:
    uint8 up to 256 classes, int16 up to 32,768, int32 beyond."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if num_classes - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


class MemoryEfficientSegmenter(nn.Module):
    """A segmentation model's inference computed piece by piece (see the module doc).

    Built by :func:`~mobilenet.memory.memory_efficient`; gives the outputs of the model it
    was built from (in eval mode), ``{"out": ...}`` (and ``"aux"``), up to float rounding;
    with ``output="labels"``, their arg-max ``[N, H, W]`` (:attr:`labels_dtype`).
    """

    def __init__(
        self, model: nn.Module, splits: int, band_rows: int | None, output: str = "logits"
    ) -> None:
        super().__init__()
        name = model.config.name
        if output not in OUTPUTS:
            raise MobileNetError(f"output must be 'logits' or 'labels', not {output!r}")
        check_arguments(list(model.backbone), name, splits, band_rows)
        folded = prepare_for_inference(model, channels_last=False)
        layers = list(folded.backbone)
        low = next(index for index, tap in folded.taps.items() if tap == "low")
        last = layers[-1] if _is_pointwise(layers[-1]) else None
        blocks = layers[1 : len(layers) - (last is not None)]
        if low > len(blocks):
            raise MobileNetError(f"{name}: the low tap must be a block's output")
        self.segments = nn.ModuleList(
            backbone_segments(layers[0], blocks, name, splits, band_rows, cuts=(low,))
        )
        # the segment whose output is the low tap: the one that ends with layer `low`
        ends = torch.tensor([len(s.layers) for s in self.segments]).cumsum(0).tolist()
        self.low_segment = ends.index(low + 1)
        register_head_forms()
        options = FormOptions(splits, band_rows, last, self.segments[-1].out_channels)
        self.head = executor_form(folded.head, options, name)
        self.aux_head = None
        if folded.aux_head is not None and output == "logits":  # a label map has no aux
            aux = dataclasses.replace(options, last=None)  # it reads the low tap only
            self.aux_head = executor_form(folded.aux_head, aux, name)
        self.splits, self.band_rows, self.output = splits, band_rows, output
        self.num_classes = self.head.num_classes
        self.labels_dtype = labels_dtype(self.num_classes)

    @torch.inference_mode()
    def forward(self, x: Tensor, size: Size | None = None) -> Outputs | Tensor:
        """``x`` ``[N, 3, H, W]``: the logits at ``H x W``, or the label map, at ``size``
        (``(height, width)``; labels only) if given, else ``H x W``."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise MobileNetError(f"expected a batch of images (N, 3, H, W), got {tuple(x.shape)}")
        if size is not None and self.output != "labels":
            raise MobileNetError("a size of its own is for the label map (output='labels')")
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise MobileNetError(f"a label map's size is (height, width), not {size!r}")
        n, in_size = x.shape[0], (x.shape[2], x.shape[3])
        result: Outputs | Tensor | None = None
        for i in range(n):  # one image at a time: its tensors only
            low, y = self._backbone(x[i], *in_size)
            logits = self.head(low, y)
            del y
            if result is None:  # after the first backbone: its peak and the output never meet
                result = self._new_output(x, tuple(size or in_size))
            chw = logits.permute(2, 0, 1).contiguous()  # a few MiB: the output's layout
            del logits
            if isinstance(result, Tensor):
                self._label(chw, in_size, result[i])
            else:
                self._upsample(chw, result["out"][i])
            del chw
            if self.aux_head is not None:  # it reads the low tap only
                aux = self.aux_head(low, None).permute(2, 0, 1).contiguous()
                self._upsample(aux, result["aux"][i])
                del aux
            del low
        return result if result is not None else self._new_output(x, tuple(size or in_size))

    def _heads(self) -> list[tuple[str, nn.Module]]:
        return [(k, h) for k, h in (("out", self.head), ("aux", self.aux_head)) if h is not None]

    def _new_output(self, x: Tensor, size: Size) -> Outputs | Tensor:
        n = x.shape[0]
        if self.output == "labels":
            return torch.empty(n, *size, dtype=self.labels_dtype, device=x.device)
        return {k: x.new_empty(n, h.num_classes, *size) for k, h in self._heads()}

    def _backbone(self, image: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        """The low tap and the last block's output, both (H, W, C)."""
        y, low = image, None
        for j, segment in enumerate(self.segments):
            y = segment(y, h, w)
            h, w = y.shape[0], y.shape[1]
            if j == self.low_segment:
                low = y
        assert low is not None
        return low, y

    def _upsample(self, chw: Tensor, out: Tensor) -> None:
        """``(classes, h, w)`` logits, bilinearly upsampled into ``out`` (classes, H, W)."""
        for r0, r1 in row_bands(out.shape[1], self.band_rows):
            upsample_rows(chw, out.shape[1:], r0, r1, channels_last=False, out=out[:, r0:r1])

    def _label(self, chw: Tensor, size: Size, out: Tensor) -> None:
        """``(classes, h, w)`` logits upsampled to ``size`` (the input's), resized to
        ``out``'s size where it differs, and arg-maxed into ``out`` (H', W'), band by band.

        Within a band, the classes go in groups whose upsampled band is no larger than the
        low-resolution logits (all at once at 1024x2048): the running largest logit and,
        where a group exceeds it, the first of the group's classes that reaches the group's
        largest, as :func:`torch.argmax` (the first of equal logits keeps its place)."""
        if not bool(chw.isfinite().all()):  # upsampling spreads them to every pixel
            raise MobileNetError(f"{NON_FINITE}; no label map")
        target = (out.shape[0], out.shape[1])
        for r0, r1 in row_bands(target[0], self.band_rows):
            labels, pixels = out[r0:r1], (r1 - r0) * target[1]
            largest = chw.new_full(labels.shape, float("-inf"))
            larger = torch.empty_like(largest, dtype=torch.bool)
            reached = torch.empty_like(larger)
            group = max(1, chw.numel() // pixels)
            for c0 in range(0, chw.shape[0], group):
                band = self._plane(chw[c0 : c0 + group], size, target, r0, r1)
                top = band.amax(0)
                torch.gt(top, largest, out=larger)
                torch.maximum(largest, top, out=largest)
                for j in range(band.shape[0] - 1, -1, -1):  # the first class written last
                    torch.eq(band[j], top, out=reached)
                    labels.masked_fill_(reached.logical_and_(larger), c0 + j)
                del band, top
            del largest, larger, reached

    @staticmethod
    def _plane(logits: Tensor, size: Size, target: Size, r0: int, r1: int) -> Tensor:
        """Rows ``[r0, r1)`` at ``target`` of ``(classes, h, w)`` logits upsampled to
        ``size``: ``(classes, r1 - r0, W')``."""
        if target == size:
            return upsample_rows(logits, size, r0, r1, channels_last=False)

        def rows_at_size(lo: int, hi: int) -> Tensor:  # what the band at `target` reads
            return upsample_rows(logits, size, lo, hi, channels_last=False)

        return resize_rows(rows_at_size, size[0], target, r0, r1)

    def analytic_peak(
        self, resolution: int | Size, batch: int = 1, size: Size | None = None
    ) -> int:
        """Peak live activation bytes (fp32) of :meth:`forward`, from the shapes alone, the
        output included (see :meth:`analytic_peaks`)."""
        return self.analytic_peaks(resolution, batch, size)[0]

    def analytic_peaks(
        self, resolution: int | Size, batch: int = 1, size: Size | None = None
    ) -> tuple[int, int, int]:
        """The peak live bytes of :meth:`forward` with the output, without it, and the
        output's bytes. Tensors of one value per channel are left out (a few KiB)."""
        in_size = height_width(resolution)
        out_size = size or in_size
        ledger = Ledger()
        for image in range(min(batch, 2)):  # from the second image on, the output is alive
            low, (y, h, w) = self._plan_backbone(ledger, *in_size)
            for key, head in self._heads():
                logits = head.plan(ledger, low[1:], (h, w))
                if key == "out":
                    ledger.free(y)
                    if image == 0:
                        self._plan_output(ledger, batch, out_size)
                c, (hl, wl) = head.num_classes, head.logits_size(low[1:], (h, w))
                chw = ledger.alloc(4 * c * hl * wl)
                ledger.free(logits)
                if self.output == "labels":  # the finiteness check: one bool per logit
                    ledger.free(ledger.alloc(c * hl * wl))
                for r0, r1 in row_bands(out_size[0], self.band_rows):
                    if self.output == "logits":  # straight into the output
                        plan_resize_rows(ledger, c, (hl, wl), in_size, r0, r1, into=True)
                        continue
                    self._plan_labels(ledger, c, (hl, wl), in_size, out_size, r0, r1)
                ledger.free(chw)
            ledger.free(low[0])
        return ledger.peak, ledger.working_peak, ledger.output

    def _plan_output(self, ledger: Ledger, batch: int, size: Size) -> None:
        if self.output == "labels":
            itemsize = torch.empty(0, dtype=self.labels_dtype).element_size()
            ledger.alloc(itemsize * batch * size[0] * size[1], output=True)
            return
        for _, head in self._heads():
            ledger.alloc(4 * batch * head.num_classes * size[0] * size[1], output=True)

    def _plan_labels(
        self, ledger: Ledger, c: int, low: Size, size: Size, target: Size, r0: int, r1: int
    ) -> None:
        """Replay one band of :meth:`_label`."""
        pixels = (r1 - r0) * target[1]
        running = ledger.alloc(4 * pixels) + ledger.alloc(pixels) + ledger.alloc(pixels)
        group = max(1, c * low[0] * low[1] // pixels)
        for c0 in range(0, c, group):
            band = self._plan_plane(ledger, min(group, c - c0), low, size, target, r0, r1)
            ledger.free(ledger.alloc(4 * pixels) + band)  # the group's largest, and its band
        ledger.free(running)

    @staticmethod
    def _plan_plane(
        ledger: Ledger, c: int, low: Size, size: Size, target: Size, r0: int, r1: int
    ) -> int:
        """Replay :meth:`_plane` of ``c`` classes; returns the band's bytes, left allocated."""
        if target == size:
            return plan_resize_rows(ledger, c, low, size, r0, r1)
        lo, hi = source_span(size[0], target[0], r0, r1)
        rows = plan_resize_rows(ledger, c, low, size, lo, hi)
        return plan_resize_rows(ledger, c, size, target, r0, r1, source=rows)

    def _plan_backbone(
        self, ledger: Ledger, h: int, w: int
    ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Replay :meth:`_backbone`: the bytes, height and width of the low tap and of the
        last block's output, both left allocated."""
        prev, low = 0, (0, 0, 0)
        for j, segment in enumerate(self.segments):
            y, h, w = segment.plan(ledger, h, w)
            if j - 1 != self.low_segment:
                ledger.free(prev)
            if j == self.low_segment:
                low = (y, h, w)
            prev = y
        return low, (prev, h, w)

    def paper_bound(self, resolution: int | tuple[int, int], batch: int = 1) -> int:
        """The largest ``|input| + |output|`` (fp32 bytes) of the backbone's layers (a block
        counting as one operation, V2 Section 5.1) and of the final upsampling."""
        size = height_width(resolution)
        c, (h, w) = 3, size
        bound, low = 0, (0, 0)
        for j, segment in enumerate(self.segments):
            largest, c, h, w = segment.bound(c, h, w)
            bound = max(bound, largest)
            if j == self.low_segment:
                low = (h, w)
        hl, wl = self.head.logits_size(low, (h, w))
        bound = max(bound, self.num_classes * (hl * wl + size[0] * size[1]))
        return 4 * batch * bound


def _is_pointwise(layer: nn.Module) -> bool:
    """Whether ``layer`` is a 1x1 conv + activation (V3's last conv)."""
    return isinstance(layer, ConvBNAct) and layer.conv.kernel_size == (1, 1)
