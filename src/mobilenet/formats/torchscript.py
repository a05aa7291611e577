"""TorchScript (``.pt``): written by export only, deprecated in PyTorch; use ``.pt2``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from ..card import ModelCard
from . import Exported, Format

__all__ = ["FORMAT", "TorchScriptFormat"]


class TorchScriptFormat(Format):
    name = "torchscript"
    rank = 90
    suffix = ".pt"
    summary = "deprecated, use pt2"
    keeps_metadata = False
    loads = False
    names_files = False  # eval does not read it back: any name

    def claims(self, path: Path, metadata: dict[str, str] | None) -> bool:
        return False  # a .pt file is a PyTorch checkpoint to eval and predict

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        from ..export.onnx import export_torchscript

        diff = export_torchscript(model, path, resolution)
        # After the write, not before: a refused export stays one error line.
        print(
            "note: TorchScript is deprecated in PyTorch (torch.jit.load warns); "
            "use --format pt2 (torch.export), which eval and predict load",
            file=sys.stderr,
        )
        return Exported(diff, "TorchScript", "dynamic batch")


FORMAT = TorchScriptFormat()
