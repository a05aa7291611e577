"""Exported files behind the ``nn.Module`` interface, with their class names and input size.

An ONNX model (ONNX Runtime), a ``torch.export`` program (``.pt2``), an ExecuTorch
program (``.pte``) and a LiteRT model (``.tflite``) each run on their own runtime; the
wrappers here let ``eval`` and ``predict`` call them like the PyTorch model they came
from. Each file keeps the model's config, classes and resolution in its metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.imagenet import default_classes
from .data.preprocess import Preprocess
from .errors import CheckpointError, MobileNetError
from .models import MobileNet, ModelConfig
from .models.base import DeployedModel

__all__ = [
    "OnnxModel",
    "Pt2Model",
    "PteModel",
    "TfliteModel",
    "Trained",
    "check_requested",
    "checked_classes",
    "onnx_shapes",
]

TFLITE_SLICE = 64  # images per LiteRT call: the interpreter's tensors grow with the batch


@dataclass
class Trained:
    model: MobileNet | DeployedModel
    classes: list[str]
    resolution: int
    path: Path | None = None  # the weights file it came from
    preprocess: Preprocess | None = None  # None: ours, from the model's eval_config

    def eval_preprocess(self) -> Preprocess:
        """The preprocessing to feed the model with, at its input resolution."""
        from .data.published import model_preprocess

        if self.preprocess is not None:
            return self.preprocess.at(self.resolution)
        return model_preprocess(self.model, self.resolution)


def saved_preprocess(metadata: Mapping[str, str], path: Path, res: int) -> Preprocess | None:
    """The preprocessing a file keeps under ``preprocess`` (None when it keeps none), at
    its input size ``res``; damaged metadata is one line naming the file."""
    if "preprocess" not in metadata:
        return None
    return Preprocess.from_json(metadata["preprocess"], str(path), res).at(res)


def saved_classes(metadata: Mapping[str, str], path: Path) -> list[str] | None:
    """The class names a file keeps under ``classes`` (None when it keeps none): a JSON
    list of strings, or the file is damaged; said in one line, not a traceback later."""
    if metadata.get("classes") is None:
        return None
    try:
        classes = json.loads(metadata["classes"])
    except ValueError as e:
        raise CheckpointError(f"{path}: metadata 'classes' is not JSON ({e})") from None
    if classes is None:  # "null": no names kept
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{path}: metadata 'classes' is not a list of class names")
    return classes


def saved_resolution(metadata: Mapping[str, str], path: Path, default: int | None = None) -> int:
    """The input size a file keeps under ``resolution`` (``default`` when it keeps none):
    a positive integer, or the file is damaged."""
    if "resolution" not in metadata and default is not None:
        return default
    value = metadata.get("resolution")
    try:
        res = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        res = 0
    if res < 1:
        raise CheckpointError(
            f"{path}: metadata 'resolution' must be a positive integer, got {value!r}"
        )
    return res


def check_requested(
    path: Path, config: Mapping[str, Any], model: str | None, width_mult: float | None
) -> None:
    """Refuse a ``--model`` or ``--width-mult`` that contradicts the model a file names in
    its ``config``; one that agrees is no error (it says nothing new)."""
    name, width = config.get("name"), config.get("width_mult", 1.0)
    if model is not None and model != name:
        raise MobileNetError(f"{path} holds {name}, not {model}")
    known = isinstance(width, (int, float))
    if width_mult is not None and known and not math.isclose(width_mult, width, rel_tol=1e-9):
        raise MobileNetError(f"{path} holds {name} at width {width}, not {width_mult}")


def checked_classes(
    metadata: Mapping[str, str], path: Path, num_classes: int, outputs: int | None = None
) -> list[str]:
    """The class names of a file that holds a model of ``num_classes`` (its config's, or
    its tensors'), whose program gives ``outputs`` logits (None: not known): its saved
    names, else numbered ones (ImageNet's for 1,000). Metadata that contradicts the
    program is damage, refused at load: names of another count would be shifted or cut,
    and a wrong class count scores every image against the wrong logits."""
    if outputs is not None and outputs != num_classes:
        raise CheckpointError(
            f"{path}: metadata 'config' says {num_classes} classes; the program outputs "
            f"{outputs} logits"
        )
    classes = saved_classes(metadata, path)
    if not classes:  # none kept ("null" or an empty list)
        return default_classes(num_classes)
    if len(classes) != num_classes:
        raise CheckpointError(
            f"{path}: metadata 'classes' lists {len(classes)} classes; the model has {num_classes}"
        )
    return classes


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


class OnnxModel(DeployedModel):
    """An ONNX Runtime session behind the ``nn.Module`` call interface."""

    def __init__(self, session, config: ModelConfig) -> None:
        super().__init__(config)
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


def load_onnx(
    path: Path,
    model: str | None = None,
    width_mult: float | None = None,
    resolution: int | None = None,
) -> Trained:
    """A classifier's ONNX file, its metadata checked against the graph it describes."""
    from .export.onnx import onnx_session, read_metadata

    session = onnx_session(path)
    metadata = read_metadata(session)
    if "config" not in metadata:
        raise MobileNetError(f"{path}: not an ONNX file written by mobilenet export/quantize")
    task = metadata.get("task", "classification")
    if task != "classification":
        raise MobileNetError(f"{path} holds a {task} model, not a classifier")
    config = _saved_config(metadata, path, model, width_mult)
    res = saved_resolution(metadata, path)
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    shape_in, shape_out = onnx_shapes(session)
    if len(shape_in) != 4 or shape_in[1:] not in ([3, res, res], [3, None, None]):
        raise CheckpointError(
            f"{path}: metadata says {res}x{res} images; the graph takes {shape_in}"
        )
    if len(shape_out) != 2:
        raise CheckpointError(f"{path}: the graph's output {shape_out} is not (batch, logits)")
    classes = checked_classes(metadata, path, config.num_classes, shape_out[1])
    preprocess = saved_preprocess(metadata, path, res)
    return Trained(OnnxModel(session, config), classes, res, path, preprocess)


def _saved_config(
    metadata: Mapping[str, str], path: Path, model: str | None, width_mult: float | None
) -> ModelConfig:
    """The classifier config an exported file keeps, refused when the command line asks
    for another model or width."""
    try:
        saved = json.loads(metadata["config"])
        config = ModelConfig(**saved)
    except (KeyError, ValueError, TypeError) as e:  # missing, not JSON, unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    check_requested(path, saved, model, width_mult)
    if not isinstance(config.num_classes, int) or config.num_classes < 1:
        raise CheckpointError(f"{path}: metadata 'config' says {config.num_classes!r} classes")
    return config


class Pt2Model(DeployedModel):
    """A ``torch.export`` program behind the ``nn.Module`` call interface, run on the CPU
    where it was exported. The program is kept outside the module tree: its module refuses
    ``train()``/``eval()``, which ``evaluate`` calls on the wrapper."""

    def __init__(
        self, program: nn.Module, config: ModelConfig, resolution: int, what: str = "the program"
    ) -> None:
        super().__init__(config)
        self.__dict__["program"] = program  # not a submodule (see above)
        self.resolution = resolution
        self.what = what  # the file, for messages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The program's own guards are not run (they are code from the file): check here.
        _check_images(x, self.resolution)
        try:
            with torch.no_grad():
                logits = self.program(x.detach().cpu().float().contiguous())
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            # A well-formed program whose operators do not fit its tensors (a crafted
            # file): what the kernels say, in one line.
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MobileNetError(f"{self.what}: the program fails to run ({reason})") from None
        return logits.to(x.device)  # beside the targets evaluate() moved there


class PteModel(DeployedModel):
    """An ExecuTorch program (``.pte``, float32 or int8) behind the ``nn.Module`` call
    interface. Its memory is planned at export time for at most ``max_batch`` images, so
    a larger batch runs in slices of that size."""

    engine = "executorch"  # the runtime; with "-int8" for an int8 file

    def __init__(
        self, run, config: ModelConfig, resolution: int, max_batch: int, precision: str
    ) -> None:
        super().__init__(config)
        self.run = run  # read_pte's callable: one slice of up to max_batch images
        self.resolution = resolution
        self.max_batch = max_batch
        self.precision = precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.resolution)
        images = x.detach().cpu().float().contiguous()
        logits = [self.run(part.contiguous()) for part in images.split(self.max_batch)]
        return torch.cat(logits).to(x.device)


class TfliteModel(PteModel):
    """A LiteRT model (``.tflite``, float32 or full-integer int8) behind the ``nn.Module``
    call interface; the interpreter resizes its input to any batch (``max_batch`` only
    bounds the slices one call holds)."""

    engine = "litert"


def _check_images(x: torch.Tensor, resolution: int) -> None:
    """Refuse a batch an exported program was not made for, before it runs."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, resolution, resolution) or x.shape[0] < 1:
        raise MobileNetError(
            f"the exported program takes (batch, 3, {resolution}, {resolution}) images, "
            f"not {tuple(x.shape)}"
        )


def _exported_settings(
    metadata: Mapping[str, str],
    path: Path,
    model: str | None,
    resolution: int | None,
    width_mult: float | None = None,
) -> tuple[ModelConfig, int]:
    """The config and input size an exported program (.pt2, .pte, .tflite) keeps,
    refused when the command line asks for another model, width or size."""
    config = _saved_config(metadata, path, model, width_mult)
    res = saved_resolution(metadata, path)
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    return config, res


def _output_count(run, path: Path, res: int) -> int:
    """How many logits a program (``run``: a batch in, logits out) gives, from one run on
    a blank image at the size its metadata names: the runtimes' readers do not expose the
    declared output shape. One image, once per load: small beside any evaluation."""
    try:
        out = run(torch.zeros(1, 3, res, res))
    except MobileNetError:
        raise
    except Exception as e:  # the runtimes raise their own types on a shape they refuse
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path}: the program does not run on the {res}x{res} images its metadata "
            f"names ({first})"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CheckpointError(f"{path}: the program's output {shape} is not (batch, logits)")
    return int(out.shape[1])


def load_pt2(
    path: Path, model: str | None, resolution: int | None, width_mult: float | None = None
) -> Trained:
    from .export.pt2 import read_pt2

    program, metadata = read_pt2(path)
    config, res = _exported_settings(metadata, path, model, resolution, width_mult)
    classes = checked_classes(metadata, path, config.num_classes)
    preprocess = saved_preprocess(metadata, path, res)
    return Trained(Pt2Model(program, config, res, str(path)), classes, res, path, preprocess)


def load_pte(
    path: Path, model: str | None, resolution: int | None, width_mult: float | None = None
) -> Trained:
    """An ExecuTorch program, run on as many threads as PyTorch here (the runtime ignores
    ``OMP_NUM_THREADS`` and would take every core)."""
    from .export.executorch import read_pte, set_pte_threads

    set_pte_threads(torch.get_num_threads())  # before the load: methods keep their pool
    run, metadata = read_pte(path)
    config, res = _exported_settings(metadata, path, model, resolution, width_mult)
    outputs = _output_count(run, path, res)
    classes = checked_classes(metadata, path, config.num_classes, outputs)
    pte = PteModel(run, config, res, int(metadata["max_batch"]), metadata.get("dtype", ""))
    return Trained(pte, classes, res, path, saved_preprocess(metadata, path, res))


def load_tflite(
    path: Path, model: str | None, resolution: int | None, width_mult: float | None = None
) -> Trained:
    """A LiteRT model, its interpreter on as many threads as PyTorch here."""
    from .export.litert import read_tflite

    run, metadata = read_tflite(path, threads=torch.get_num_threads())
    config, res = _exported_settings(metadata, path, model, resolution, width_mult)
    outputs = _output_count(run, path, res)
    classes = checked_classes(metadata, path, config.num_classes, outputs)
    tflite = TfliteModel(run, config, res, TFLITE_SLICE, metadata.get("dtype", ""))
    return Trained(tflite, classes, res, path, saved_preprocess(metadata, path, res))


def load_int8(
    state_dict,
    metadata: dict[str, str],
    path: Path,
    resolution: int | None,
    model: str | None = None,
    width_mult: float | None = None,
) -> Trained:
    """A PyTorch int8 file; its tensors fit its config's class count, or it is refused."""
    from .export.int8 import int8_from_checkpoint

    res = saved_resolution(metadata, path)  # first: the graph is rebuilt at this size
    saved_classes(metadata, path)  # damaged names refused before the graph is rebuilt
    int8 = int8_from_checkpoint(state_dict, metadata, str(path))
    check_requested(path, int8.config.to_dict(), model, width_mult)
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    classes = checked_classes(metadata, path, int8.num_classes)
    return Trained(int8, classes, res, path, saved_preprocess(metadata, path, res))
