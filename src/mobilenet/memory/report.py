"""The standard forward against the memory-efficient one: memory and time (V2 Section 5.1).

Memory is reported three ways (:func:`memory_report`, ``mobilenet memory``):

* **analytic**: the peak of the live activations at fp32, from the shapes alone. For the
  standard forward it is :func:`mobilenet.cost`'s ``peak_activation_bytes`` (times the
  batch); for the executor it replays the executor's schedule of allocations.
* **paper bound**: the largest ``|input| + |output|`` of any operation, an inverted
  residual block counting as one operation (V2 Section 5.1).
* **measured**: the peak total size of the storages that the forward pass really
  allocates, observed with :class:`~mobilenet.memory.PeakMemory` (a dispatch mode that
  sees every operator's output and a finaliser that sees every storage freed). Workspaces
  private to a kernel (e.g. a convolution's reorder buffers) are below the operator level
  and are not seen, in either forward. The executor's measured peak equals its analytic
  one. The standard forward measures one tensor above its analytic figure: eager
  ``nn.Sequential`` holds each block's input until the block returns, where the traced
  graph frees it after its last reader (V2 at 224: 9.95 MiB measured, 9.19 MiB analytic,
  the 0.77 MiB of the 112x112x16 input of the first expanding block).
* **measured without the output**: the same observation with the storage of the forward's
  result left out, as if the caller had allocated it beforehand (``measure_peak(...,
  without_result=True)``). For a classifier the logits are a few bytes and the two agree;
  a segmentation model returns full-size logits (1024x2048, 21 classes: 168 MiB), which
  no forward can avoid holding: with them counted, the executor's peak can never drop
  below the output's share of the standard one.

The standard forward used for comparison is the model with BatchNorm folded, NCHW, in
inference mode (``prepare_for_inference(model, channels_last=False)``). The executor keeps
its maps as (H, W, C) (channels_last), which makes the depthwise convs faster on CPUs: part
of its time advantage at large resolutions is that layout, not the splitting.
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

__all__ = ["MemoryReport", "check_input_size", "compare_forwards", "format_report", "memory_report"]


@dataclass(frozen=True)
class MemoryReport:
    """What ``mobilenet memory`` prints: both forwards' memory and time (bytes at fp32).

    ``resolution`` is as given (a side, or ``(height, width)``); ``output_bytes`` the
    result both forwards return (logits, batch included); ``max_abs_output`` the largest
    output value, the scale that ``max_abs_diff`` is to be read against."""

    model: str
    width_mult: float
    resolution: int | tuple[int, int]
    batch: int
    splits: int
    band_rows: int | None
    threads: int
    analytic: dict[str, int]
    measured: dict[str, int]
    measured_without_output: dict[str, int]
    output_bytes: int
    time_ms: dict[str, float]
    max_abs_diff: float
    max_abs_output: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_report(
    name: str,
    width_mult: float = 1.0,
    splits: int = 4,
    resolution: int | tuple[int, int] = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> MemoryReport:
    """Compare the standard forward with the memory-efficient one on random weights, for a
    registered classifier or segmentation model, at a side or ``(height, width)``.

    Refused in one line when the model cannot fit the memory available
    (:func:`mobilenet.limits.check_memory`). See :func:`compare_forwards`.
    """
    from ..limits import check_memory, meta_model
    from ..models import create_model

    check_input_size(resolution)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise MobileNetError(f"batch must be a positive integer, got {batch!r}")
    # Sized on the meta device first: a resolution or batch that cannot fit is refused in
    # one line instead of by the allocator (or the kernel) halfway through.
    check_memory(meta_model(name, width_mult=width_mult), resolution, batch, "the comparison")
    model = create_model(name, width_mult=width_mult).eval()
    return compare_forwards(model, splits, resolution, batch, band_rows, repeats, seed)


def compare_forwards(
    model: nn.Module,
    splits: int = 4,
    resolution: int | tuple[int, int] = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> MemoryReport:
    """The report for ``model`` as it is (e.g. with trained weights), on a random batch.

    The standard forward is the model with BatchNorm folded, NCHW, in inference mode
    (``prepare_for_inference(model, channels_last=False)``). Times are medians of
    ``repeats`` calls each, the two forwards taking turns, on the current thread count.
    """
    size = check_input_size(resolution)
    model = model.eval()
    efficient = memory_efficient(model, splits, band_rows)
    standard = prepare_for_inference(model, channels_last=False)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    run_standard = _in_inference_mode(standard)
    peaks = efficient.analytic_peaks(resolution, batch)
    analytic = _analytic_peaks(standard, efficient, resolution, batch, peaks[0])
    measured, without_output = _measured_peaks(standard, run_standard, efficient, x)
    expected, actual = _outputs(run_standard(x)), _outputs(efficient(x))
    diff = max((e - a).abs().max().item() for e, a in zip(expected, actual, strict=True))
    scale = max(e.abs().max().item() for e in expected)
    del expected, actual
    time_ms = _median_times({"standard": run_standard, "efficient": efficient}, x, repeats)
    config = getattr(model, "config", None)
    return MemoryReport(
        model=getattr(config, "name", type(model).__name__),
        width_mult=getattr(config, "width_mult", 1.0),
        resolution=resolution,
        batch=batch,
        splits=splits,
        band_rows=band_rows,
        threads=torch.get_num_threads(),
        analytic=analytic,
        measured=measured,
        measured_without_output=without_output,
        output_bytes=peaks[2],
        time_ms=time_ms,
        max_abs_diff=diff,
        max_abs_output=scale,
    )


def check_input_size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of a side or a pair, each side checked by
    :func:`mobilenet.cost.check_resolution`."""
    from ..cost import check_resolution

    pair = resolution if isinstance(resolution, tuple | list) else (resolution, resolution)
    if len(pair) != 2:
        raise MobileNetError(f"resolution must be a side or (height, width), got {resolution!r}")
    h, w = (check_resolution(side) for side in pair)
    return h, w


def _outputs(result: Tensor | dict[str, Tensor]) -> list[Tensor]:
    """A forward's result as a list: the logits, or a segmentation model's dict in order."""
    return [result[k] for k in sorted(result)] if isinstance(result, dict) else [result]


def _in_inference_mode(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``model``'s forward, run in inference mode."""

    def run(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(images)

    return run


def _analytic_peaks(
    standard: nn.Module,
    efficient: nn.Module,
    resolution: int | tuple[int, int],
    batch: int,
    efficient_peak: int,
) -> dict[str, int]:
    """Both forwards' peak live activations from the shapes alone, and the paper's bound."""
    from ..cost import cost

    return {
        "standard_bytes": cost(standard, resolution).peak_activation_bytes * batch,
        "efficient_bytes": efficient_peak,
        "paper_bound_bytes": efficient.paper_bound(resolution, batch),
    }


def _measured_peaks(
    standard: nn.Module,
    run_standard: Callable[[Tensor], Any],
    efficient: nn.Module,
    x: Tensor,
) -> tuple[dict[str, int], dict[str, int]]:
    """Both forwards' peak allocated bytes on ``x``, weights and input excluded: with the
    result, and without it."""
    with_output, without_output = {}, {}
    for key, fn, module in (
        ("standard", run_standard, standard),
        ("efficient", efficient, efficient),
    ):
        with_output[f"{key}_bytes"] = measure_peak(fn, x, module=module)
        without_output[f"{key}_bytes"] = measure_peak(fn, x, module=module, without_result=True)
    return with_output, without_output


def _median_times(
    forwards: dict[str, Callable[[Tensor], Tensor]], x: Tensor, repeats: int
) -> dict[str, float]:
    """The median milliseconds of ``repeats`` calls of each forward, the forwards taking turns."""
    times: dict[str, list[float]] = {key: [] for key in forwards}
    for _ in range(repeats):
        for key, fn in forwards.items():
            start = time.perf_counter()
            fn(x)
            times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def format_report(report: MemoryReport) -> str:
    """``mobilenet memory``'s table."""
    a = report.analytic
    tiling = f"bands of {report.band_rows} rows" if report.band_rows else "no tiling"
    threads = f"{report.threads} thread{'s' if report.threads > 1 else ''}"
    rows = _table_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    h, w = check_input_size(report.resolution)
    lines = [
        f"{report.model} (width {report.width_mult:g}) at {h}x{w}, batch {report.batch}, "
        f"t={report.splits}, {tiling}, {threads}"
    ]
    for r in rows:
        right = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *right]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        f"paper's bound, largest |input| + |output| of an operation: {_mib(a['paper_bound_bytes'])}"
    )
    lines.append(
        f"output (the logits both forwards return): {_mib(report.output_bytes)}, counted in "
        "every peak but the one without it"
    )
    lines.append(
        f"outputs: max abs difference {report.max_abs_diff:.1e} "
        f"(largest |output| {report.max_abs_output:.2g})"
    )
    return "\n".join(lines)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _row(label: str, standard: float, efficient: float, unit: str) -> tuple[str, str, str, str]:
    if unit == "ms":
        return label, f"{standard:.1f} ms", f"{efficient:.1f} ms", f"{efficient / standard:.2f}"
    return label, _mib(standard), _mib(efficient), f"{efficient / standard:.3f}"


def _table_rows(report: MemoryReport) -> list[tuple[str, str, str, str]]:
    """The table's header and its rows: analytic peak, measured peaks, time."""
    a, m, t = report.analytic, report.measured, report.time_ms
    wo = report.measured_without_output
    return [
        ("", "standard", "memory-efficient", "ratio"),
        _row("analytic peak (fp32)", a["standard_bytes"], a["efficient_bytes"], "MiB"),
        _row("measured peak", m["standard_bytes"], m["efficient_bytes"], "MiB"),
        _row("measured, without output", wo["standard_bytes"], wo["efficient_bytes"], "MiB"),
        _row("time (median)", t["standard"], t["efficient"], "ms"),
    ]
