"""ONNX (``.onnx``): export and int8 QDQ quantization, read by ONNX Runtime; the
``onnxruntime`` and ``onnxruntime-int8`` engines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..deployed import Trained, checked_classes, exported_card
from ..errors import CheckpointError
from ..models import ModelConfig
from ..models.base import DeployedModel
from . import BenchSetup, Engine, Exported, Format, LoadRequest, QuantizeRequest

__all__ = ["FORMAT", "OnnxFormat", "OnnxModel", "onnx_shapes", "ort_session"]


class OnnxModel(DeployedModel):
    """An ONNX Runtime session behind the ``nn.Module`` call interface."""

    engine = "onnxruntime"  # the runtime; "onnxruntime-int8" for an int8 file

    def __init__(self, session, config: ModelConfig, engine: str = "onnxruntime") -> None:
        super().__init__(config)
        self.session = session
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def _side(dim: Any) -> int | None:
    """A declared dimension of an ONNX graph: an integer, or None when symbolic."""
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def onnx_shapes(session) -> tuple[list[int | None], list[int | None]]:
    """The declared shapes of an ONNX session's first input and output (None for a
    symbolic dimension such as the batch)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if not inputs or not outputs:
        return [], []
    return [_side(d) for d in inputs[0].shape], [_side(d) for d in outputs[0].shape]


def ort_session(path: Path, threads: int, spin: bool):
    """An ONNX Runtime CPU session on ``threads`` threads. ``spin=False`` makes idle pool
    threads sleep at once instead of spinning for more work: when the threads fill the
    free cores, spinning takes them from the other engines and from the machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _bench_float(setup: BenchSetup):
    from ..export import export_onnx

    path = setup.tmp / "model.onnx"
    export_onnx(setup.model, path, setup.resolution)
    return _bench_session(path, setup)


def _bench_int8(setup: BenchSetup):
    """The file ``quantize`` writes: the modules it keeps in float32 stay so here too."""
    from ..export import export_onnx
    from ..export.quantize import float_modules, quantize_file

    path = setup.tmp / "model.onnx"
    export_onnx(setup.model, path, setup.resolution)
    assert setup.calibration is not None
    batches = ({"images": x.numpy()} for x in setup.calibration())
    keep = float_modules(setup.model.config.name)
    quantize_file(path, setup.tmp / "model.int8.onnx", batches, keep)
    return _bench_session(setup.tmp / "model.int8.onnx", setup)


def _bench_session(path: Path, setup: BenchSetup):
    session = ort_session(path, setup.threads, setup.spin)
    feed = {"images": setup.images.numpy()}
    return lambda: session.run(None, feed)


class OnnxFormat(Format):
    name = "onnx"
    rank = 10
    suffix = ".onnx"
    extra = "deploy"
    modules = ("onnx", "onnxruntime")
    summary = "ONNX, checked against ONNX Runtime (dynamic batch)"
    tasks = ("classification", "segmentation", "detection", "encoder")
    # The tasks whose files eval and predict hand to their task's commands (an encoder's
    # refuse them in one line).
    reads = ("classification", "segmentation", "encoder")
    quantizes = True
    integer_only = True
    options = ("opset",)

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        from ..export.onnx import DEFAULT_OPSET, export_onnx

        opset = options.get("opset") or DEFAULT_OPSET
        diff = export_onnx(model, path, resolution, opset, card.metadata())
        return Exported(diff, "ONNX Runtime", "dynamic batch")

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        from ..export.onnx import onnx_session, read_metadata
        from ..export.onnx_int8 import runnable_int8_session
        from ..export.quantize import quantize_onnx

        out = quantize_onnx(
            trained,
            request.data,
            request.out,
            request.images,
            progress=request.progress,
            integer_only=request.integer_only,
        )
        session = onnx_session(out)
        written = ModelCard.read(read_metadata(session), str(out))
        # Where this CPU's int8 kernels do not compute the file, eval and predict run its
        # QDQ graph in float32 here: say so now (the file is right; the kernels are not).
        kept = written.preprocess
        normalise = {"mean": kept.mean, "std": kept.std} if kept is not None else {}
        scores = written.num_classes != 0  # an encoder's features have no first class
        runnable_int8_session(out, session, trained.size, warn=_warn, scores=scores, **normalise)
        scheme = written.quantization or {}  # what the file says, not a second guess
        kept = ", ".join(scheme.get("float_modules", ()))
        every = f"{kept} in float32, " if kept else "every operator in int8, "
        used = scheme.get("calibration_images")
        return f"ONNX QDQ, {every}calibrated on {used} images of {request.data}"

    def metadata(self, path: Path) -> dict[str, str]:
        from ..export.onnx import onnx_session, read_metadata

        return read_metadata(onnx_session(path))

    def task_of(self, path: Path) -> str:
        """The task of a classifier's, a segmentation model's or an encoder's file; a
        detector's raw heads are read as ONNX only by ``detect``, so any other file is
        taken as a classifier's."""
        task = self.metadata(path).get("task", "classification")
        return task if task in self.reads else "classification"

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """A classifier's ONNX file, its card checked against the graph it describes."""
        from ..export.onnx import onnx_session, read_metadata

        session = onnx_session(path)
        metadata = read_metadata(session)
        if "config" not in metadata:
            raise CheckpointError(f"{path}: not an ONNX file written by mobilenet export/quantize")
        card, config, res = exported_card(
            metadata, path, request.model, request.width_mult, request.resolution
        )
        shape_in, shape_out = onnx_shapes(session)
        if len(shape_in) != 4 or shape_in[1:] not in ([3, res, res], [3, None, None]):
            raise CheckpointError(
                f"{path}: metadata says {res}x{res} images; the graph takes {shape_in}"
            )
        if len(shape_out) != 2:
            raise CheckpointError(f"{path}: the graph's output {shape_out} is not (batch, logits)")
        classes = checked_classes(card, path, config.num_classes, shape_out[1])
        engine = "onnxruntime-int8" if card.precision == "int8" else "onnxruntime"
        if card.precision == "int8":  # where this CPU's int8 kernels compute the file
            from ..export.onnx_int8 import runnable_int8_session

            kept = card.preprocess
            normalise = {"mean": kept.mean, "std": kept.std} if kept is not None else {}
            session = runnable_int8_session(path, session, (res, res), warn=_warn, **normalise)
        model = OnnxModel(session, config, engine)
        return Trained(model, classes, res, path, card.preprocess, card)

    def engines(self) -> tuple[Engine, ...]:
        common = {"modules": self.modules, "extra": self.extra, "format": self.name}
        return (
            Engine("onnxruntime", _bench_float, predicts=True, fallback=2, **common),
            Engine("onnxruntime-int8", _bench_int8, precision="int8", **common),
        )


FORMAT = OnnxFormat()
