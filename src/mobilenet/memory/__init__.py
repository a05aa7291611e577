"""Memory-efficient inference for inverted-residual networks (V2 Section 5.1).

The package holds:

* :mod:`~mobilenet.memory.executor`: the executor of V2 Section 5.1,
  :func:`memory_efficient` and :class:`MemoryEfficientMobileNet`: each block computed over
  ``t`` channel groups of its expansion, the leading high-resolution layers tiled into
  bands of rows (:mod:`~mobilenet.memory.backbone`), the last conv fused with the pool;
  with the analytic peak of its schedule and the paper's bound. Its layers (the stem and
  the block, band by band and group by group, atrous or not) and the operations they are
  made of (the convolution geometry, the in-place activations and the ledger that replays
  the allocations) are in :mod:`~mobilenet.memory.ops`; MobileNetV4's (UIB, fused IB,
  Mobile MQA) in :mod:`~mobilenet.memory.v4`; which layer computes which block is one
  table, :mod:`~mobilenet.memory.forms`.
* :mod:`~mobilenet.memory.segmentation`: :class:`MemoryEfficientSegmenter`, the same for
  LR-ASPP and DeepLabv3 (what :func:`memory_efficient` builds for a segmentation model),
  with the heads and the banded bilinear upsampling in :mod:`~mobilenet.memory.heads`,
  which registers their forms in the table.
* :mod:`~mobilenet.memory.profiler`: :class:`PeakMemory` and :func:`measure_peak`, the
  activation memory a forward pass really allocates.
* :mod:`~mobilenet.memory.report`: :func:`memory_report` (a registered model, random
  weights), :func:`compare_forwards` (a model as it is), :class:`MemoryReport` and
  :func:`format_report`, the standard forward against the executor, analytic, measured
  and bound memory and time (``mobilenet memory``).
"""

from .executor import DEFAULT_BAND_ROWS as DEFAULT_BAND_ROWS
from .executor import TILE_STRIDE as TILE_STRIDE
from .executor import MemoryEfficientMobileNet, memory_efficient
from .profiler import PeakMemory, measure_peak
from .report import MemoryReport, compare_forwards, format_report, memory_report
from .segmentation import MemoryEfficientSegmenter

__all__ = [
    "MemoryEfficientMobileNet",
    "MemoryEfficientSegmenter",
    "MemoryReport",
    "PeakMemory",
    "compare_forwards",
    "format_report",
    "measure_peak",
    "memory_efficient",
    "memory_report",
]
