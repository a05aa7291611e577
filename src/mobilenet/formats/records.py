"""The fastest engine of each machine, chosen by measurement.

Which engine is fastest depends on the CPU (its ISA features decide the kernels), on the
model and its width, on the batch, the resolution and the thread count: ONNX Runtime
wins at batch 1 on most x86 CPUs, yet folded PyTorch can beat it elsewhere. So
``mobilenet bench --save`` records its medians in ``$MOBILENET_HOME/engines.json``,
keyed by the machine (CPU model name and ISA features) and by the configuration, and
``mobilenet predict --engine auto`` runs the fastest engine recorded for its own case.

The file::

    {"version": 1, "machines": {MACHINE: {"cpu": {...}, "records": {CONFIG: {
        "model": ..., "width_mult": ..., "batch": ..., "resolution": ..., "threads": ...,
        "median_ms": {ENGINE: ms, ...}}}}}}

A new measurement replaces the same engine's older one for the same machine and
configuration, and keeps the rest: engines benchmarked on different days add up.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from ..errors import MobileNetError
from ..fileio import write_json
from ..paths import cache_dir

__all__ = [
    "config_key",
    "fastest",
    "load_records",
    "machine_key",
    "recorded_medians",
    "records_path",
    "save_measurements",
]

VERSION = 1


def records_path() -> Path:
    """``$MOBILENET_HOME/engines.json``: beside the other files the toolkit generates."""
    return cache_dir() / "engines.json"


def machine_key(info: dict | None = None) -> str:
    """The CPU model name and its ISA features (from :func:`mobilenet.machine.cpu`): two
    machines alike in both run the same kernels, so their rankings carry over."""
    if info is None:
        from ..machine import cpu

        info = cpu()
    return f"{info['model']} [{' '.join(info['isa'])}]"


def config_key(model: str, width_mult: float, batch: int, resolution: int, threads: int) -> str:
    """One configuration of a benchmark, as a readable key."""
    return f"{model} width={width_mult:g} batch={batch} resolution={resolution} threads={threads}"


def load_records(path: Path | None = None) -> dict:
    """The records file's contents (an empty record where there is none). A file that is
    not a record is refused in one line rather than overwritten or half-read."""
    path = records_path() if path is None else path
    if not path.is_file():
        return {"version": VERSION, "machines": {}}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MobileNetError(f"{path}: not readable as engine records ({e}); remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        raise MobileNetError(f"{path}: not a file of engine records; remove it")
    return data


def save_measurements(result: dict, path: Path | None = None) -> Path:
    """Merge the medians of a :func:`mobilenet.bench.run_bench` result into the records
    file (rewritten atomically): the same engine's older median for the same machine and
    configuration is replaced, the others are kept."""
    path = records_path() if path is None else path
    data = load_records(path)
    machine = data["machines"].setdefault(machine_key(result["cpu"]), {})
    if not isinstance(machine.get("records"), dict):
        machine["records"] = {}
    machine["cpu"] = {k: result["cpu"][k] for k in ("model", "isa")}
    setting = ("model", "width_mult", "batch", "resolution", "threads")
    key = config_key(*(result[k] for k in setting))
    record = machine["records"].get(key)
    if not isinstance(record, dict) or not isinstance(record.get("median_ms"), dict):
        record = {"median_ms": {}}
    record.update({k: result[k] for k in setting})
    record["median_ms"].update({row["engine"]: row["median_ms"] for row in result["engines"]})
    machine["records"][key] = record
    write_json(path, data)
    return path


def _distance(record: dict, batch: int, resolution: int) -> tuple[float, float, int]:
    """How far a record is from the case at hand: resolution first (an engine's ranking
    shifts with the image size), then batch (log scale: 8 is nearer 16 than 1 is to 2)."""
    r, b = record["resolution"], record["batch"]
    return abs(math.log(r / resolution)), abs(math.log(b / batch)), b


def _valid(record: object) -> bool:
    """Whether a record holds what the lookup reads (hand-edited files may not)."""
    if not isinstance(record, dict) or not isinstance(record.get("median_ms"), dict):
        return False
    numbers = [record.get(k) for k in ("width_mult", "batch", "resolution", "threads")]
    return isinstance(record.get("model"), str) and all(
        isinstance(n, int | float) and not isinstance(n, bool) and n > 0 for n in numbers
    )


def recorded_medians(
    model: str,
    width_mult: float,
    batch: int,
    resolution: int,
    threads: int,
    info: dict | None = None,
) -> dict[str, float]:
    """The medians (ms) recorded on this machine for ``model`` at ``width_mult`` and
    ``threads``, from the record nearest in resolution and batch; empty without one.
    Other machines and thread counts are ignored: their rankings do not carry over."""
    machine = load_records()["machines"].get(machine_key(info))
    records = machine.get("records") if isinstance(machine, dict) else None
    if not isinstance(records, dict):
        return {}
    matching = [
        r
        for r in records.values()
        if _valid(r)
        and (r["model"], float(r["width_mult"]), r["threads"]) == (model, width_mult, threads)
    ]
    if not matching:
        return {}
    nearest = min(matching, key=lambda r: _distance(r, max(batch, 1), resolution))
    medians = nearest["median_ms"].items()
    return {e: float(m) for e, m in medians if isinstance(m, int | float) and m > 0}


def fastest(medians: dict[str, float], candidates: Iterable[str]) -> str | None:
    """The candidate with the smallest recorded median, or None when none was recorded."""
    timed = [e for e in candidates if e in medians]
    return min(timed, key=medians.__getitem__) if timed else None
