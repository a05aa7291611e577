"""PyTorch int8 models (x86, FX graph mode) as safetensors: ``quantize --format torch``
(PTQ or QAT), read by eval and predict; the ``torch-int8`` engine."""

from __future__ import annotations

from pathlib import Path

import torch

from ..deployed import Trained, check_requested, checked_classes
from ..errors import MobileNetError
from . import BenchSetup, Engine, Format, LoadRequest, QuantizeRequest, square_classifiers_only

__all__ = ["FORMAT", "TorchInt8Format"]


def _bench(setup: BenchSetup):
    from ..export.int8 import quantize_model

    assert setup.calibration is not None
    int8 = quantize_model(setup.model, setup.calibration(), setup.resolution)

    def run():
        with torch.inference_mode():
            return int8(setup.images)

    return run


class TorchInt8Format(Format):
    name = "torch"
    rank = 20
    suffix = ".safetensors"
    summary = "PyTorch int8 (x86) safetensors: PTQ or QAT"
    quantizes = True
    methods = ("ptq", "qat")
    names_files = False  # read by its metadata: any name
    loads = True

    def claims(self, path: Path, metadata: dict[str, str] | None) -> bool:
        from ..export.int8_file import is_int8_checkpoint

        return metadata is not None and is_int8_checkpoint(metadata)

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        """Post-training quantization. QAT (``methods`` names it: it writes this format) is
        a training run of its own, :mod:`mobilenet.classification.qat`."""
        from ..export.int8 import quantize_torch
        from ..export.int8_file import save_int8

        if request.method != "ptq":
            raise MobileNetError(f"--method {request.method} is a training run, not a format's")
        model = quantize_torch(trained, request.data, request.images, progress=request.progress)
        save_int8(model, request.out, trained.model_card())
        used = model.calibration_images
        return f"PyTorch x86, calibrated on {used} images of {request.data}"

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """A PyTorch int8 file; its tensors fit its card's class count, or it is refused."""
        from ..export.int8_file import int8_from_checkpoint
        from ..weights import read_checkpoint

        state_dict, metadata = read_checkpoint(path)
        int8, card = int8_from_checkpoint(state_dict, metadata, str(path))
        check_requested(path, int8.config.to_dict(), request.model, request.width_mult)
        res = card.resolution
        assert res is not None  # int8_from_checkpoint refuses a file without one
        if request.resolution is not None and request.resolution != res:
            raise MobileNetError(f"{path} takes {res}x{res} images, not {request.resolution}")
        int8.engine = "torch-int8"
        classes = checked_classes(card, path, int8.num_classes)
        return Trained(int8, classes, res, path, card.preprocess, card)

    def engines(self) -> tuple[Engine, ...]:
        return (
            Engine(
                "torch-int8",
                _bench,
                precision="int8",
                refuses=square_classifiers_only("torch-int8"),
            ),
        )


FORMAT = TorchInt8Format()
