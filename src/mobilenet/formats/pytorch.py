"""PyTorch in this process: the float weights themselves (our safetensors and the
torchvision, timm and Keras files ``load_weights`` reads), run eagerly, with BatchNorm
folded, or compiled; the engines ``eager``, ``eager-fused``, ``compile`` and
``torchvision-eager`` (torchvision's own model, for comparison)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import BenchSetup, Engine, Format

__all__ = ["FORMAT", "PyTorchFormat"]

TORCHVISION = frozenset({"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"})


def _inference(model: nn.Module, x: torch.Tensor):
    def run():
        with torch.inference_mode():
            return model(x)

    return run


def _fused(model: nn.Module) -> nn.Module:
    from ..export import prepare_for_inference

    return prepare_for_inference(model, channels_last=False)


def _bench_eager(setup: BenchSetup):
    return _inference(setup.model, setup.images)


def _bench_fused(setup: BenchSetup, compiled: bool = False):
    from ..export import prepare_for_inference

    fused = prepare_for_inference(setup.model)
    if compiled:
        fused = torch.compile(fused)
    return _inference(fused, setup.images.contiguous(memory_format=torch.channels_last))


def _bench_torchvision(setup: BenchSetup):
    import torchvision

    model = getattr(torchvision.models, setup.model.config.name)().eval()
    return _inference(model, setup.images)


class PyTorchFormat(Format):
    name = "pytorch"
    rank = 0
    summary = "float weights in PyTorch (safetensors; torchvision, timm and Keras files)"
    loads = False  # weights are read by the tasks' loaders (mobilenet.weights)

    def claims(self, path: Path, metadata: dict[str, str] | None) -> bool:
        return False

    def engines(self) -> tuple[Engine, ...]:
        return (
            Engine("eager", _bench_eager, predicts=True, in_process=lambda m: m),
            Engine("eager-fused", _bench_fused, predicts=True, in_process=_fused, fallback=1),
            Engine("compile", lambda s: _bench_fused(s, compiled=True)),
            Engine(
                "torchvision-eager",
                _bench_torchvision,
                modules=("torchvision",),
                applies=lambda case: case.model in TORCHVISION and case.width == 1.0,
            ),
        )


FORMAT = PyTorchFormat()
