"""Memory-efficient inference for the segmentation models (LR-ASPP, DeepLabv3).

The backbone runs as in the classifier's executor (V2 Section 5.1: every inverted
residual over ``t`` channel groups of its expansion, the leading high-resolution layers
in bands of rows), its atrous depthwise convs included: a band of a dilated conv reads a
halo of ``dilation * (k // 2)`` rows. The segment ending at the ``"low"`` tap (the first
layer at output stride 8) is kept for the head; the head runs on (H, W, C) maps at output
stride 16 or 8 (:mod:`mobilenet.memory.heads`); the logits are upsampled to the input size
band by band, straight into the output.

The output, ``[N, classes, H, W]`` float32 logits (and ``"aux"`` when the model has the
auxiliary head), is allocated once the first image's head has run, so that the
backbone's peak and the output never meet at batch 1: at 1024x2048 with 21 classes it is
168 MiB, more than everything else the executor holds together. It is the result any forward must
return; :func:`~mobilenet.memory.measure_peak` can leave it out (``without_result``), and
:meth:`MemoryEfficientSegmenter.analytic_peak` reports the peak with and without it.
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
from .heads import plan_upsample, register_head_forms, row_bands, upsample_rows
from .ops import Ledger, height_width

__all__ = ["MemoryEfficientSegmenter"]

Outputs = dict[str, Tensor]


class MemoryEfficientSegmenter(nn.Module):
    """A segmentation model's inference computed piece by piece (see the module doc).

    Built by :func:`~mobilenet.memory.memory_efficient`; gives the outputs of the model it
    was built from (in eval mode), ``{"out": ...}`` (and ``"aux"``), up to float rounding.
    """

    def __init__(self, model: nn.Module, splits: int, band_rows: int | None) -> None:
        super().__init__()
        name = model.config.name
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
        if folded.aux_head is not None:  # it reads the low tap, not through `last`
            aux = dataclasses.replace(options, last=None)
            self.aux_head = executor_form(folded.aux_head, aux, name)
        self.splits, self.band_rows = splits, band_rows
        self.num_classes = self.head.num_classes

    @torch.inference_mode()
    def forward(self, x: Tensor) -> Outputs:
        if x.dim() != 4 or x.shape[1] != 3:
            raise MobileNetError(f"expected a batch of images (N, 3, H, W), got {tuple(x.shape)}")
        n, size = x.shape[0], (x.shape[2], x.shape[3])
        outputs: Outputs = {}
        for i in range(n):  # one image at a time: its tensors only
            low, y = self._backbone(x[i], *size)
            logits = self.head(low, y)
            del y
            if not outputs:  # after the first backbone: its peak and the output never meet
                outputs = {k: x.new_empty(n, h.num_classes, *size) for k, h in self._heads()}
            self._upsample(logits, outputs["out"][i])
            del logits
            if self.aux_head is not None:  # it reads the low tap only
                aux = self.aux_head(low, None)
                self._upsample(aux, outputs["aux"][i])
                del aux
            del low
        return outputs

    def _heads(self) -> list[tuple[str, nn.Module]]:
        return [(k, h) for k, h in (("out", self.head), ("aux", self.aux_head)) if h is not None]

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

    def _upsample(self, logits: Tensor, out: Tensor) -> None:
        """``(h, w, classes)`` logits, bilinearly upsampled into ``out`` (classes, H, W)."""
        chw = logits.permute(2, 0, 1).contiguous()  # a few MiB: the output's layout
        for r0, r1 in row_bands(out.shape[1], self.band_rows):
            out[:, r0:r1].copy_(upsample_rows(chw, out.shape[1:], r0, r1, channels_last=False))

    def analytic_peak(self, resolution: int | tuple[int, int], batch: int = 1) -> int:
        """Peak live activation bytes (fp32) of :meth:`forward`, from the shapes alone, the
        output included (see :meth:`analytic_peaks`)."""
        return self.analytic_peaks(resolution, batch)[0]

    def analytic_peaks(
        self, resolution: int | tuple[int, int], batch: int = 1
    ) -> tuple[int, int, int]:
        """The peak live bytes of :meth:`forward` with the output, without it, and the
        output's bytes. Tensors of one value per channel are left out (a few KiB)."""
        size = height_width(resolution)
        ledger = Ledger()
        for image in range(min(batch, 2)):  # from the second image on, the output is alive
            low, (y, h, w) = self._plan_backbone(ledger, *size)
            for key, head in self._heads():
                logits = head.plan(ledger, low[1:], (h, w))
                if key == "out":
                    ledger.free(y)
                    for _, each in self._heads() if image == 0 else ():
                        ledger.alloc(4 * batch * each.num_classes * size[0] * size[1], True)
                hl, wl = head.logits_size(low[1:], (h, w))
                chw = ledger.alloc(4 * head.num_classes * hl * wl)
                for r0, r1 in row_bands(size[0], self.band_rows):
                    ledger.free(plan_upsample(ledger, head.num_classes, wl, size, r0, r1))
                ledger.free(chw)
                ledger.free(logits)
            ledger.free(low[0])
        return ledger.peak, ledger.working_peak, ledger.output

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
