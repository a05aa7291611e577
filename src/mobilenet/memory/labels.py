"""The label-map executor against the standard forward and the logits executor: memory,
time and agreement of the label maps (``mobilenet memory --output labels``).

A segmentation model's standard forward returns its full-resolution logits (at 1024x2048
with 21 classes, 168 MiB), which the caller arg-maxes into the label map a phone shows.
``memory_efficient(model, output="labels")`` returns that map directly, arg-maxing the
upsampled logits one band of rows at a time (:mod:`mobilenet.memory.segmentation`), so the
logits never exist whole. :func:`labels_report` measures the three forwards as
:func:`~mobilenet.memory.memory_report` measures two: the analytic peak, the measured peak
with and without the output, the median time (the three taking turns); and counts the
pixels where the map equals the standard forward's arg-max and the logits executor's.

The map equals the logits executor's arg-max exactly (the banded upsampling gives every
pixel the logits the whole-image resize gives it), and the standard forward's except where
its two largest logits are closer than the float rounding by which the executor's logits
differ from its own: with BatchNorm at its initial statistics (logits near 0.03), 2 pixels
of 2,097,152 at 1024x2048 (``benchmarks/memory_labels.json``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MobileNetError
from ..export.prepare import prepare_for_inference
from .executor import DEFAULT_BAND_ROWS, memory_efficient
from .profiler import measure_peak
from .report import check_input_size, compare_forwards

__all__ = ["LabelsReport", "compare_labels", "format_labels_report", "labels_report"]

FORWARDS = ("standard", "logits", "labels")  # the standard forward, the two executors


@dataclass(frozen=True)
class LabelsReport:
    """What ``mobilenet memory --output labels`` prints (bytes at fp32 activations).

    ``analytic``, ``measured``, ``measured_without_output`` and ``time_ms`` are keyed by
    :data:`FORWARDS` (``time_ms`` also by ``"standard_argmax"``: the standard forward and
    the arg-max of its logits, its way to the label map); ``output_bytes`` by
    ``"logits"`` (what the standard forward and the logits executor return) and
    ``"labels"``. ``equal_to_standard`` and
    ``equal_to_logits`` count the pixels (of ``pixels``) whose label is the arg-max of
    the standard forward's logits and of the logits executor's; ``largest_gap_differing``
    is the largest gap between the standard forward's two largest logits at a pixel
    where the labels differ from its arg-max (0 where none do); ``max_abs_diff`` the
    largest difference of the two forwards' logits."""

    model: str
    width_mult: float
    resolution: int | tuple[int, int]
    batch: int
    splits: int
    band_rows: int | None
    threads: int
    labels_dtype: str
    output_bytes: dict[str, int]
    analytic: dict[str, int]
    measured: dict[str, int]
    measured_without_output: dict[str, int]
    time_ms: dict[str, float]
    pixels: int
    equal_to_standard: int
    equal_to_logits: int
    largest_gap_differing: float
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labels_report(
    name: str,
    width_mult: float = 1.0,
    splits: int = 4,
    resolution: int | tuple[int, int] = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> LabelsReport:
    """The report for registered segmentation model ``name`` on random weights (see
    :func:`compare_labels`); a classifier, or a size that cannot fit the memory
    available, is refused in one line."""
    from ..limits import check_memory, meta_model
    from ..models import create_model

    check_input_size(resolution)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise MobileNetError(f"batch must be a positive integer, got {batch!r}")
    check_memory(meta_model(name, width_mult=width_mult), resolution, batch, "the comparison")
    model = create_model(name, width_mult=width_mult).eval()
    return compare_labels(model, splits, resolution, batch, band_rows, repeats, seed)


def compare_labels(
    model: nn.Module,
    splits: int = 4,
    resolution: int | tuple[int, int] = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> LabelsReport:
    """The report for segmentation model ``model`` as it is, on the random batch that
    :func:`~mobilenet.memory.compare_forwards` uses (whose figures for the standard forward
    and the logits executor it takes). Times are medians of ``repeats`` calls each, the
    three forwards taking turns."""
    size = check_input_size(resolution)
    model = model.eval()
    labels = memory_efficient(model, splits, band_rows, output="labels")  # refuses classifiers
    base = compare_forwards(model, splits, resolution, batch, band_rows, 1, seed)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    peak, _, label_bytes = labels.analytic_peaks(resolution, batch)
    standard = prepare_for_inference(model, channels_last=False)
    logits = memory_efficient(model, splits, band_rows)
    agreement = _agreement(labels(x), _run(standard), logits, x)
    forwards = {
        "standard": _run(standard),
        "standard_argmax": lambda images: _run(standard)(images)["out"].argmax(1),
        "logits": logits,
        "labels": labels,
    }
    a, m, wo = base.analytic, base.measured, base.measured_without_output
    config = getattr(model, "config", None)
    return LabelsReport(
        model=base.model,
        width_mult=getattr(config, "width_mult", 1.0),
        resolution=resolution,
        batch=batch,
        splits=splits,
        band_rows=band_rows,
        threads=torch.get_num_threads(),
        labels_dtype=str(labels.labels_dtype).removeprefix("torch."),
        output_bytes={"logits": base.output_bytes, "labels": label_bytes},
        analytic={"standard": a["standard_bytes"], "logits": a["efficient_bytes"], "labels": peak},
        measured={
            "standard": m["standard_bytes"],
            "logits": m["efficient_bytes"],
            "labels": measure_peak(labels, x, module=labels),
        },
        measured_without_output={
            "standard": wo["standard_bytes"],
            "logits": wo["efficient_bytes"],
            "labels": measure_peak(labels, x, module=labels, without_result=True),
        },
        time_ms=_median_times(forwards, x, repeats),
        **agreement,
        max_abs_diff=base.max_abs_diff,
    )


def _run(model: nn.Module) -> Callable[[Tensor], Any]:
    def run(images: Tensor) -> Any:
        with torch.inference_mode():
            return model(images)

    return run


def _agreement(
    labels: Tensor, standard: Callable[[Tensor], Any], logits: nn.Module, x: Tensor
) -> dict[str, Any]:
    """Pixels where ``labels`` equal the standard forward's arg-max and the logits
    executor's; the standard's top-two gap where they differ from its arg-max."""
    labels = labels.long()
    reference = standard(x)["out"]
    differ = labels != reference.argmax(1)
    top2 = reference.topk(2, dim=1).values
    gaps = (top2[:, 0] - top2[:, 1])[differ]
    del reference, top2
    return {
        "pixels": labels.numel(),
        "equal_to_standard": int((~differ).sum()),
        "equal_to_logits": int((labels == logits(x)["out"].argmax(1)).sum()),
        "largest_gap_differing": gaps.max().item() if gaps.numel() else 0.0,
    }


def _median_times(
    forwards: dict[str, Callable[[Tensor], Any]], x: Tensor, repeats: int
) -> dict[str, float]:
    """The median milliseconds of ``repeats`` calls of each forward, taking turns."""
    times: dict[str, list[float]] = {key: [] for key in forwards}
    for _ in range(repeats):
        for key, fn in forwards.items():
            start = time.perf_counter()
            fn(x)
            times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def format_labels_report(report: LabelsReport) -> str:
    """``mobilenet memory --output labels``'s table: the three forwards, and the labels'
    peak over the standard forward's."""
    tiling = f"bands of {report.band_rows} rows" if report.band_rows else "no tiling"
    threads = f"{report.threads} thread{'s' if report.threads > 1 else ''}"
    h, w = check_input_size(report.resolution)
    rows = [("", "standard", "executor: logits", "executor: labels", "labels / standard")]
    for label, figures in (
        ("analytic peak (fp32)", report.analytic),
        ("measured peak", report.measured),
        ("measured, without output", report.measured_without_output),
    ):
        cells = [_mib(figures[k]) for k in FORWARDS]
        rows.append((label, *cells, f"{figures['labels'] / figures['standard']:.3f}"))
    t = report.time_ms
    times = [f"{t[k]:.1f} ms" for k in FORWARDS]
    rows.append(("time (median)", *times, f"{t['labels'] / t['standard']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        f"{report.model} (width {report.width_mult:g}) at {h}x{w}, batch {report.batch}, "
        f"t={report.splits}, {tiling}, {threads}"
    ]
    for r in rows:
        right = (c.rjust(n) for c, n in zip(r[1:], widths[1:], strict=True))
        cells = [r[0].ljust(widths[0]), *right]
        lines.append("  ".join(cells).rstrip())
    lines.append(f"the standard forward and its arg-max: {t['standard_argmax']:.1f} ms")
    out = report.output_bytes
    lines.append(
        f"output: logits {_mib(out['logits'])} (standard, executor: logits); label map "
        f"{report.labels_dtype} {_mib(out['labels'])} (executor: labels)"
    )
    lines.append(_agreement_line(report))
    return "\n".join(lines)


def _agreement_line(report: LabelsReport) -> str:
    n = report.pixels
    line = (
        f"labels: the standard forward's arg-max at {report.equal_to_standard:,} of {n:,} "
        f"pixels, the logits executor's at {report.equal_to_logits:,}"
    )
    if report.equal_to_standard < n:
        line += (
            f" (where they differ, the standard's two largest logits are within "
            f"{report.largest_gap_differing:.1e}: the logits' rounding, "
            f"max abs difference {report.max_abs_diff:.1e})"
        )
    return line


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"
