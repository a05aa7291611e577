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
  Atrous (dilated) depthwise convs are computed alike: a band of a conv of dilation d
  reads a halo of ``d * (k // 2)`` rows (:mod:`mobilenet.memory.backbone` holds the
  segments).
* **The head.** The last 1x1 conv is fused with the global average pool, computed in
  channel groups no larger than its input, so its output map is never materialised.
  Segmentation models have heads of their own (:mod:`mobilenet.memory.segmentation`).
* **Batches** are processed one image at a time.

BatchNorm is folded first (:func:`~mobilenet.export.prepare.fold_batchnorm`) and every
activation runs in place. The input tensor and the weights are not counted as activation
memory, here or in the measurements.

How much memory the executor saves, and what it costs in time, is reported by
:mod:`mobilenet.memory.report`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import MobileNetError
from ..export.prepare import prepare_for_inference
from ..layers import ConvBNAct
from .backbone import DEFAULT_BAND_ROWS, TILE_STRIDE, backbone_segments, check_arguments
from .forms import check_supported
from .ops import Ledger, activate_, activation_kind, channel_groups, conv_bias, height_width
from .segmentation import MemoryEfficientSegmenter

__all__ = ["DEFAULT_BAND_ROWS", "TILE_STRIDE", "MemoryEfficientMobileNet", "memory_efficient"]


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
        self.act = activation_kind(last.act)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.register_buffer("weight", conv.weight.detach().flatten(1).t().contiguous())
        self.register_buffer("bias", conv_bias(conv))
        self.groups = channel_groups(
            conv.out_channels, math.ceil(conv.out_channels / conv.in_channels)
        )
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
            activate_(self.act, y)
            torch.mean(y, 0, out=pooled[0, c0:c1])
            del y
        return self.classifier(self.pre_logits(pooled))[0]

    def plan(self, ledger: Ledger, hw: int) -> None:
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
        check_arguments(list(getattr(model, "features", [])), name, splits, band_rows)
        folded = prepare_for_inference(model, channels_last=False)
        stem, *body, last = folded.features
        self.segments = nn.ModuleList(backbone_segments(stem, body, name, splits, band_rows))
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

    def analytic_peak(self, resolution: int | tuple[int, int], batch: int = 1) -> int:
        """Peak live activation bytes (fp32) of :meth:`forward`, from the shapes alone.

        A batch is processed one image at a time: from the second image on, the logits
        of the batch are alive too. Tensors of one value per channel (squeeze-excite's,
        the pooled features) are left out: a few KiB against MiBs.
        """
        return self.analytic_peaks(resolution, batch)[0]

    def analytic_peaks(
        self, resolution: int | tuple[int, int], batch: int = 1
    ) -> tuple[int, int, int]:
        """The peak of :meth:`analytic_peak` with the output (the batch's logits), without
        it, and the output's bytes."""
        ledger = Ledger()
        output = 4 * batch * self.head.out_features
        if batch > 1:
            ledger.alloc(output, output=True)
        h, w = height_width(resolution)
        prev = 0
        for segment in self.segments:
            y, h, w = segment.plan(ledger, h, w)
            ledger.free(prev)
            prev = y
        self.head.plan(ledger, h * w)
        return ledger.peak, ledger.working_peak, output

    def paper_bound(self, resolution: int | tuple[int, int], batch: int = 1) -> int:
        """The largest ``|input| + |output|`` of any operation (V2 Section 5.1), in bytes at
        fp32: the stem, each block as one operation, the last conv, the classifier."""
        h, w = height_width(resolution)
        c = 3
        bound = 0
        for segment in self.segments:
            largest, c, h, w = segment.bound(c, h, w)
            bound = max(bound, largest)
        bound = max(bound, c * h * w + self.head.out_channels * h * w)
        return 4 * batch * bound


def memory_efficient(
    model: nn.Module,
    splits: int = 4,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    output: str = "logits",
) -> MemoryEfficientMobileNet | MemoryEfficientSegmenter:
    """The memory-efficient executor of V2 Section 5.1 for an inverted-residual network:
    a V2 or V3 classifier (atrous or not), a V4 classifier (UIB, fused IB and Mobile MQA
    blocks: :mod:`mobilenet.memory.v4` says what its peak becomes), or a segmentation
    model on V2 or V3 (LR-ASPP, DeepLabv3; see :mod:`mobilenet.memory.segmentation`).

    ``splits`` is the paper's t: the number of channel groups each block's expansion is
    computed in. ``band_rows`` is the height, in output rows, of the bands the leading
    high-resolution layers are tiled into, and of the bands a segmentation model's
    upsampling is computed in (``None``: no tiling). The model is copied and its BatchNorm
    folded; it is left as it is.

    ``output`` is what the executor returns: ``"logits"``, as the model; or, for a
    segmentation model, ``"labels"``: the label map, the arg-max of the logits computed
    band by band so that the full-resolution logits never exist (see
    :mod:`mobilenet.memory.segmentation`).

    >>> net = memory_efficient(create_model("mobilenet_v2"), splits=4)
    >>> logits = net(torch.randn(1, 3, 224, 224))  # model.eval()(x), up to rounding
    """
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    check_supported(model, name)
    if getattr(model, "main_output", None) is not None:  # a segmentation model's maps
        return MemoryEfficientSegmenter(model, splits, band_rows, output)
    if output != "logits":
        if output == "labels":
            raise MobileNetError(
                f"a label map (output 'labels') is a segmentation model's output; {name} "
                "is a classifier, whose output is logits"
            )
        raise MobileNetError(f"output must be 'logits' or 'labels', not {output!r}")
    return MemoryEfficientMobileNet(model, splits, band_rows)
