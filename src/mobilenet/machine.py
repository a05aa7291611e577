"""What the machine is, can hold and who else uses it: the CPU with its ISA features, the
memory still free on a device, in readable units; the cores this process may use and the
load other processes put on them (``mobilenet bench`` records them beside its timings)."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "available_memory",
    "busy_jiffies",
    "cores",
    "cpu",
    "format_bytes",
    "free_cores",
    "has_bf16",
    "load_snapshot",
    "machine",
    "other_busy_cores",
    "others_since",
]


def format_bytes(nbytes: float) -> str:
    """``1.5 GiB``: binary units, up to EiB (absurd sizes are the point of this module)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:,.1f} EiB"


def available_memory(device: str | torch.device | None = None) -> int | None:
    """Bytes that can still be allocated on ``device``: the free memory CUDA reports for a
    GPU, else ``MemAvailable`` from ``/proc/meminfo``. None where the system does not say
    (not Linux): the check is then skipped rather than guessed."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
    return None


def busy_jiffies(stat: str) -> int:
    """All cores' busy time since boot, in clock ticks, from a /proc/stat text. Steal time
    counts: the hypervisor gave the cores to someone else. Guest time is in user already."""
    fields = [int(v) for v in stat.splitlines()[0].split()[1:9]]  # user .. steal
    return sum(fields) - fields[3] - fields[4]  # less idle and iowait


def other_busy_cores(before: str, after: str, own_s: float, wall_s: float, hz: int = 100) -> float:
    """Cores that other processes kept busy between two /proc/stat texts: the machine's
    busy time less this benchmark's own (its process and its children), over wall time."""
    busy_s = (busy_jiffies(after) - busy_jiffies(before)) / hz
    return max(0.0, busy_s - own_s) / max(wall_s, 1e-9)


def load_snapshot() -> tuple[str, float, float]:
    """/proc/stat, the CPU seconds of this process and its reaped children, the clock."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    return _read("/proc/stat"), own, time.perf_counter()


def others_since(start: tuple[str, float, float]) -> float | None:
    """Cores other processes kept busy since ``start`` (None without /proc/stat)."""
    (stat0, own0, t0), (stat1, own1, t1) = start, load_snapshot()
    if not (stat0 and stat1):
        return None
    return other_busy_cores(stat0, stat1, own1 - own0, t1 - t0, os.sysconf("SC_CLK_TCK"))


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_cores(sample_s: float = 0.2) -> float:
    """The cores this process may use that other processes left idle over ``sample_s``."""
    start = load_snapshot()
    time.sleep(sample_s)
    return cores() - (others_since(start) or 0.0)


def _read(path: str) -> str:
    """A /proc file's text; empty where there is none (not Linux)."""
    return Path(path).read_text() if Path(path).is_file() else ""


ISA = {  # the features that decide which kernels an engine can use, by /proc/cpuinfo names
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "BF16": ("avx512_bf16",),
    "AMX": ("amx_tile",),
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _read(path: str) -> str:
    """A /proc file's text; empty where there is none (not Linux)."""
    return Path(path).read_text() if Path(path).is_file() else ""


def _field(cpuinfo: str, name: str) -> str:
    """The first processor's ``name`` field in a /proc/cpuinfo text (empty when absent)."""
    lines = cpuinfo.splitlines()
    return next((ln.partition(":")[2].strip() for ln in lines if ln.startswith(name)), "")


def has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (what ``openvino-bf16`` needs)."""
    return bool(set(_field(_read("/proc/cpuinfo"), "flags").split()) & set(BF16_FLAGS))


def cpu(cpuinfo: str | None = None) -> dict:
    """The CPU's model name, core count and ISA features, for recorded results: int8 and
    bf16 speed depend on VNNI, BF16 and AMX more than on anything else."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    flags = set(_field(text, "flags").split())
    isa = [name for name, names in ISA.items() if flags & set(names)]
    model = _field(text, "model name") or platform.machine()
    return {"model": model, "cores": os.cpu_count(), "isa": isa}


def machine() -> str:
    """The CPU model and core count, for recorded results."""
    return "{model}, {cores} cores".format(**cpu())
