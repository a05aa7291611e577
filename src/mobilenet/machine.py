"""What the machine can hold: the memory still free on a device, in readable units."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["available_memory", "format_bytes"]


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
