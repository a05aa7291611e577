"""LiteRT models (``.tflite``, float32 or full-integer int8); the ``litert`` and
``litert-int8`` engines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..deployed import Trained, checked_classes, exported_card, output_count
from . import (
    BenchSetup,
    Engine,
    Exported,
    Format,
    LoadRequest,
    QuantizeRequest,
    runtime_engines,
    square_classifiers_only,
)
from .executorch import PteModel

__all__ = ["FORMAT", "TFLITE_SLICE", "TfliteFormat", "TfliteModel"]

TFLITE_SLICE = 64  # images per LiteRT call: the interpreter's tensors grow with the batch


class TfliteModel(PteModel):
    """A LiteRT model (``.tflite``, float32 or full-integer int8) behind the ``nn.Module``
    call interface; the interpreter resizes its input to any batch (``max_batch`` only
    bounds the slices one call holds)."""

    runtime = "litert"


def _bench(setup: BenchSetup, int8: bool):
    """The model as a LiteRT model (int8: full-integer, calibrated like the other int8
    engines) in the LiteRT interpreter on ``setup.threads`` threads."""
    from ..export.litert import export_tflite, export_tflite_int8, read_tflite

    path = setup.tmp / "model.tflite"
    if int8:
        assert setup.calibration is not None
        export_tflite_int8(setup.model, setup.calibration(), path, setup.resolution)
    else:
        export_tflite(setup.model, path, setup.resolution)
    run, _ = read_tflite(path, threads=setup.threads)
    return lambda: run(setup.images)


class TfliteFormat(Format):
    name = "tflite"
    rank = 40
    suffix = ".tflite"
    extra = "litert"
    modules = ("litert_torch", "ai_edge_litert")
    summary = 'LiteRT model (batch 1, resizable; pip install "mobilenet[litert]")'
    tasks = ("classification", "encoder")
    quantizes = True

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        from ..export.litert import export_tflite, tflite_batch, tflite_metadata

        diff = export_tflite(model, path, resolution, card.metadata())
        batch = tflite_batch(tflite_metadata(path.read_bytes(), str(path)))
        return Exported(diff, "LiteRT", batch)

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        from ..export.litert import quantize_tflite

        used, diff = quantize_tflite(
            trained, request.data, request.out, request.images, progress=request.progress
        )
        return (
            f"full-integer LiteRT model, batch 1 (larger batches run image by image), "
            f"calibrated on {used} images of {request.data}; "
            f"max abs difference from the float model {diff:.2e}"
        )

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """A LiteRT model, its interpreter on as many threads as PyTorch here."""
        from ..export.litert import read_tflite

        run, metadata = read_tflite(path, threads=torch.get_num_threads())
        card, config, res = exported_card(
            metadata, path, request.model, request.width_mult, request.resolution
        )
        classes = checked_classes(card, path, config.num_classes, output_count(run, path, res))
        precision = metadata.get("dtype", card.precision)
        tflite = TfliteModel(run, config, res, TFLITE_SLICE, precision)
        return Trained(tflite, classes, res, path, card.preprocess, card)

    def metadata(self, path: Path) -> dict[str, str]:
        from ..export.litert import read_tflite

        return read_tflite(path)[1]

    def task_of(self, path: Path) -> str:
        """The task its card names (a classifier's, or an encoder's, whose commands
        refuse ``eval`` and ``predict`` in one line)."""
        return self.metadata(path).get("task", "classification")

    def engines(self) -> tuple[Engine, ...]:
        return runtime_engines(self, "litert", _bench, square_classifiers_only)


FORMAT = TfliteFormat()
