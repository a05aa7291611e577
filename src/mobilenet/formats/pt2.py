"""``torch.export`` programs (``.pt2``): export, and eval and predict on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..deployed import Trained, check_images, checked_classes, exported_card
from ..errors import MobileNetError
from ..models import ModelConfig
from ..models.base import DeployedModel
from . import Exported, Format, LoadRequest

__all__ = ["FORMAT", "Pt2Format", "Pt2Model"]


class Pt2Model(DeployedModel):
    """A ``torch.export`` program behind the ``nn.Module`` call interface, run on the CPU
    where it was exported. The program is kept outside the module tree: its module refuses
    ``train()``/``eval()``, which ``evaluate`` calls on the wrapper."""

    engine = "pt2"

    def __init__(
        self, program: nn.Module, config: ModelConfig, resolution: int, what: str = "the program"
    ) -> None:
        super().__init__(config)
        self.__dict__["program"] = program  # not a submodule (see above)
        self.resolution = resolution
        self.what = what  # the file, for messages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The program's own guards are not run (they are code from the file): check here.
        check_images(x, self.resolution)
        try:
            with torch.no_grad():
                logits = self.program(x.detach().cpu().float().contiguous())
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # A well-formed program whose operators do not fit its tensors (a crafted
            # file): what the kernels say, in one line.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MobileNetError(f"{self.what}: the program fails to run ({reason})") from None
        return logits.to(x.device)  # beside the targets evaluate() moved there


class Pt2Format(Format):
    name = "pt2"
    rank = 60
    suffix = ".pt2"
    summary = "torch.export program (dynamic batch), run by PyTorch"

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        from ..export.pt2 import export_pt2

        diff = export_pt2(model, path, resolution, card.metadata())
        return Exported(diff, "torch.export", "dynamic batch")

    def load(self, path: Path, request: LoadRequest) -> Trained:
        from ..export.pt2 import read_pt2

        program, metadata = read_pt2(path)
        card, config, res = exported_card(
            metadata, path, request.model, request.width_mult, request.resolution
        )
        classes = checked_classes(card, path, config.num_classes)
        model = Pt2Model(program, config, res, str(path))
        return Trained(model, classes, res, path, card.preprocess, card)


FORMAT = Pt2Format()
