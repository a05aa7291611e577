"""One process or many: torchrun's environment decides, the training code does not care.

Under ``torchrun --nproc-per-node N -m mobilenet train ...`` every process joins a
process group (gloo on CPU, NCCL on CUDA) and trains a DistributedDataParallel replica
on its shard of each batch; only rank 0 prints and writes files. Without torchrun the
same code runs as a group of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import MobileNetError

__all__ = ["Distributed", "setup"]


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op]
            dist.all_reduce(tensor, reduce_op)
        return tensor

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (BatchNorm statistics) over the processes, so
        every replica evaluates and saves the same network."""
        if not self.enabled:
            return
        with torch.no_grad():
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    self.all_reduce(buffer).div_(self.world_size)

    def replica_checksums(self, module: torch.nn.Module) -> list[float]:
        """A checksum of each process's weights and buffers (equal when the replicas are)."""
        with torch.no_grad():
            local = sum(
                (t.double() * (i + 1)).sum() for i, t in enumerate(module.state_dict().values())
            )
        gathered = torch.zeros(self.world_size, dtype=torch.float64, device=self.device)
        gathered[self.rank] = local
        return self.all_reduce(gathered).tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MobileNetError(f"unknown device {device!r} (use cpu, cuda, cuda:N or auto)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MobileNetError("--device cuda: no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if dev.index >= count:
            hint = " (torchrun: at most one process per GPU)" if device == "cuda" else ""
            raise MobileNetError(f"{dev}: this machine has {count} CUDA device(s){hint}")
    return dev


def setup(device: str = "auto") -> Distributed:
    """Join torchrun's process group if there is one; pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank, dev)
