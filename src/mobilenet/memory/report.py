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
from .executor import DEFAULT_BAND_ROWS, MemoryEfficientMobileNet, memory_efficient
from .profiler import measure_peak

__all__ = ["MemoryReport", "format_report", "memory_report"]


@dataclass(frozen=True)
class MemoryReport:
    """What ``mobilenet memory`` prints: both forwards' memory and time (bytes at fp32)."""

    model: str
    width_mult: float
    resolution: int
    batch: int
    splits: int
    band_rows: int | None
    threads: int
    analytic: dict[str, int]
    measured: dict[str, int]
    time_ms: dict[str, float]
    max_abs_diff: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_report(
    name: str,
    width_mult: float = 1.0,
    splits: int = 4,
    resolution: int = 224,
    batch: int = 1,
    band_rows: int | None = DEFAULT_BAND_ROWS,
    repeats: int = 3,
    seed: int = 0,
) -> MemoryReport:
    """Compare the standard forward with the memory-efficient one on random weights.

    Refused in one line when the model cannot fit the memory available
    (:func:`mobilenet.limits.check_memory`).

    The standard forward is the model with BatchNorm folded, NCHW, in inference mode
    (``prepare_for_inference(model, channels_last=False)``). Times are medians of
    ``repeats`` calls each, the two forwards taking turns, on the current thread count.
    """
    from ..cost import check_resolution
    from ..limits import check_memory, meta_model
    from ..models import create_model

    check_resolution(resolution)
    if not isinstance(batch, int) or batch <= 0:
        raise MobileNetError(f"batch must be a positive integer, got {batch!r}")
    # Sized on the meta device first: a resolution or batch that cannot fit is refused in
    # one line instead of by the allocator (or the kernel) halfway through.
    check_memory(meta_model(name, width_mult=width_mult), resolution, batch, "the comparison")
    model = create_model(name, width_mult=width_mult).eval()
    efficient = memory_efficient(model, splits, band_rows)
    standard = prepare_for_inference(model, channels_last=False)
    x = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    run_standard = _in_inference_mode(standard)
    analytic = _analytic_peaks(standard, efficient, resolution, batch)
    measured = _measured_peaks(standard, run_standard, efficient, x)
    diff = (run_standard(x) - efficient(x)).abs().max().item()
    time_ms = _median_times({"standard": run_standard, "efficient": efficient}, x, repeats)
    return MemoryReport(
        model=name,
        width_mult=width_mult,
        resolution=resolution,
        batch=batch,
        splits=splits,
        band_rows=band_rows,
        threads=torch.get_num_threads(),
        analytic=analytic,
        measured=measured,
        time_ms=time_ms,
        max_abs_diff=diff,
    )


def _in_inference_mode(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``model``'s forward, run in inference mode."""

    def run(images: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(images)

    return run


def _analytic_peaks(
    standard: nn.Module, efficient: MemoryEfficientMobileNet, resolution: int, batch: int
) -> dict[str, int]:
    """Both forwards' peak live activations from the shapes alone, and the paper's bound."""
    from ..cost import cost

    return {
        "standard_bytes": cost(standard, resolution).peak_activation_bytes * batch,
        "efficient_bytes": efficient.analytic_peak(resolution, batch),
        "paper_bound_bytes": efficient.paper_bound(resolution, batch),
    }


def _measured_peaks(
    standard: nn.Module,
    run_standard: Callable[[Tensor], Tensor],
    efficient: MemoryEfficientMobileNet,
    x: Tensor,
) -> dict[str, int]:
    """Both forwards' peak allocated bytes on ``x``, weights and input excluded."""
    return {
        "standard_bytes": measure_peak(run_standard, x, module=standard),
        "efficient_bytes": measure_peak(efficient, x, module=efficient),
    }


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
    lines = [
        f"{report.model} (width {report.width_mult:g}) at {report.resolution}x"
        f"{report.resolution}, batch {report.batch}, t={report.splits}, {tiling}, {threads}"
    ]
    for r in rows:
        right = [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        cells = [r[0].ljust(widths[0]), *right]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        f"paper's bound, largest |input| + |output| of an operation: {_mib(a['paper_bound_bytes'])}"
    )
    lines.append(f"outputs: max abs difference {report.max_abs_diff:.1e}")
    return "\n".join(lines)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _table_rows(report: MemoryReport) -> list[tuple[str, str, str, str]]:
    """The table's header and its rows: analytic peak, measured peak, time."""
    a, m, t = report.analytic, report.measured, report.time_ms
    return [
        ("", "standard", "memory-efficient", "ratio"),
        (
            "analytic peak (fp32)",
            _mib(a["standard_bytes"]),
            _mib(a["efficient_bytes"]),
            f"{a['efficient_bytes'] / a['standard_bytes']:.3f}",
        ),
        (
            "measured peak",
            _mib(m["standard_bytes"]),
            _mib(m["efficient_bytes"]),
            f"{m['efficient_bytes'] / m['standard_bytes']:.3f}",
        ),
        (
            "time (median)",
            f"{t['standard']:.1f} ms",
            f"{t['efficient']:.1f} ms",
            f"{t['efficient'] / t['standard']:.2f}",
        ),
    ]
