"""ExecuTorch programs (``.pte``, XNNPACK; float32 or int8) for phones; the
``executorch`` and ``executorch-int8`` engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..deployed import Trained, check_images, checked_classes, exported_card, output_count
from ..models import ModelConfig
from ..models.base import DeployedModel
from . import (
    BenchCase,
    BenchSetup,
    Engine,
    Exported,
    Format,
    LoadRequest,
    QuantizeRequest,
    runtime_engines,
    square_classifiers_only,
)

__all__ = ["FORMAT", "PteFormat", "PteModel"]


class PteModel(DeployedModel):
    """An ExecuTorch program (``.pte``, float32 or int8) behind the ``nn.Module`` call
    interface. Its memory is planned at export time for at most ``max_batch`` images, so
    a larger batch runs in slices of that size."""

    runtime = "executorch"

    def __init__(
        self, run, config: ModelConfig, resolution: int, max_batch: int, precision: str
    ) -> None:
        super().__init__(config)
        self.run = run  # the reader's callable: one slice of up to max_batch images
        self.resolution = resolution
        self.max_batch = max_batch
        self.precision = precision

    @property
    def engine(self) -> str:
        """The engine it runs on: its runtime's, ``-int8`` for an int8 file."""
        return f"{self.runtime}-int8" if self.precision == "int8" else self.runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.resolution)
        images = x.detach().cpu().float().contiguous()
        logits = [self.run(part.contiguous()) for part in images.split(self.max_batch)]
        return torch.cat(logits).to(x.device)


def _bench(setup: BenchSetup, int8: bool):
    """The model as an ExecuTorch program (int8: calibrated like the other int8 engines),
    on ``setup.threads`` threads: the runtime starts a pool of one thread per core."""
    from ..export.executorch import export_pte, export_pte_int8, read_pte, set_pte_threads

    path = setup.tmp / "model.pte"
    batch = setup.images.shape[0]  # a program planned for the batch it is timed at
    if int8:
        assert setup.calibration is not None
        export_pte_int8(setup.model, setup.calibration(), path, setup.resolution, max_batch=batch)
    else:
        export_pte(setup.model, path, setup.resolution, max_batch=batch)
    set_pte_threads(setup.threads)  # before the load (see set_pte_threads)
    run, _ = read_pte(path)
    return lambda: run(setup.images)


def _refuses(engine: str):
    square = square_classifiers_only(engine)

    def refuses(case: BenchCase) -> str | None:
        from ..export.executorch import MAX_BATCH

        if case.batch > MAX_BATCH:
            return f"{engine} runs batches of 1 to {MAX_BATCH}, not {case.batch}"
        return square(case)

    return refuses


class PteFormat(Format):
    name = "pte"
    rank = 30
    suffix = ".pte"
    extra = "mobile"
    modules = ("executorch",)
    summary = (
        "ExecuTorch program (XNNPACK; a batch of 1, or 1 to --max-batch; "
        'pip install "mobilenet[mobile]")'
    )
    tasks = ("classification", "encoder")
    quantizes = True
    integer_only = True
    options = ("max_batch",)

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        from ..export.executorch import export_pte

        most = options.get("max_batch") or 1  # ExecuTorch's recipe: a static batch of 1
        diff = export_pte(model, path, resolution, card.metadata(), max_batch=most)
        return Exported(diff, "ExecuTorch", "batch 1" if most == 1 else f"batch 1 to {most}")

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        from ..export.executorch import quantize_pte

        used, diff = quantize_pte(
            trained,
            request.data,
            request.out,
            request.images,
            progress=request.progress,
            integer_only=request.integer_only,
        )
        every = "every operator in int8, " if request.integer_only else ""
        return (
            f"ExecuTorch program for XNNPACK, {every}calibrated on {used} images of "
            f"{request.data}; max abs difference from the float model {diff:.2e}"
        )

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """An ExecuTorch program, run on as many threads as PyTorch here (the runtime
        ignores ``OMP_NUM_THREADS`` and would take every core)."""
        from ..export.executorch import read_pte, set_pte_threads

        set_pte_threads(torch.get_num_threads())  # before the load: methods keep their pool
        run, metadata = read_pte(path)
        card, config, res = exported_card(
            metadata, path, request.model, request.width_mult, request.resolution
        )
        classes = checked_classes(card, path, config.num_classes, output_count(run, path, res))
        precision = metadata.get("dtype", card.precision)
        pte = PteModel(run, config, res, int(metadata["max_batch"]), precision)
        return Trained(pte, classes, res, path, card.preprocess, card)

    def metadata(self, path: Path) -> dict[str, str]:
        from ..export.executorch import read_pte

        return read_pte(path)[1]

    def task_of(self, path: Path) -> str:
        """The task its card names (a classifier's, or an encoder's, whose commands
        refuse ``eval`` and ``predict`` in one line)."""
        return self.metadata(path).get("task", "classification")

    def engines(self) -> tuple[Engine, ...]:
        return runtime_engines(self, "executorch", _bench, _refuses)


FORMAT = PteFormat()
