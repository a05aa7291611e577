"""Using a trained model: load it with its classes, evaluate it, classify images."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .data import builtin_splits, eval_transform, load_rgb
from .data.datasets import BUILTIN, ImageFolder
from .data.images import require_regular_file
from .errors import CheckpointError, MobileNetError
from .export.int8 import Int8Model, is_int8_checkpoint
from .extras import available, require
from .models import MobileNet, ModelConfig
from .models.base import DeployedModel
from .models.pretrained import resolve_weights
from .models.registry import model_from_checkpoint
from .weights import read_checkpoint, saved_config

__all__ = [
    "PREDICT_ENGINES",
    "OnnxModel",
    "Pt2Model",
    "PteModel",
    "Trained",
    "check_image_files",
    "choose_engine",
    "evaluate_on",
    "inference_engine",
    "load_trained",
    "predict",
]


@dataclass
class Trained:
    model: MobileNet | DeployedModel
    classes: list[str]
    resolution: int
    path: Path | None = None  # the weights file it came from


def load_trained(
    weights: str,
    model: str | None = None,
    width_mult: float | None = None,
    resolution: int | None = None,
) -> Trained:
    """A model ready for inference, with its class names and input resolution.

    Our own files carry the model name, width, classes and training resolution; for a
    torchvision or timm checkpoint, ``model`` (and ``width_mult``) must be given and the
    classes are numbered.
    """
    path = resolve_weights(weights)
    if path.suffix == ".onnx":
        return _load_onnx(path, resolution)
    if path.suffix == ".pt2":
        return _load_pt2(path, model, resolution)
    if path.suffix == ".pte":
        return _load_pte(path, model, resolution)
    state_dict, metadata = read_checkpoint(path)
    if is_int8_checkpoint(metadata):
        return _load_int8(state_dict, metadata, path, resolution)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{path}: {e}") from None
    name = model or (saved["name"] if saved else None)
    if name is None:
        raise MobileNetError(f"{weights} does not say which model it holds: pass --model")
    kwargs = {} if width_mult is None else {"width_mult": width_mult}
    net = model_from_checkpoint(name, state_dict, metadata, str(path), **kwargs).eval()
    classes = _saved_classes(metadata, path)
    if classes is None or len(classes) != net.num_classes:
        classes = [str(i) for i in range(net.num_classes)]
    res = resolution or _saved_resolution(metadata, path, net.eval_config.resolution)
    return Trained(net, classes, res, path)


def _saved_classes(metadata: Mapping[str, str], path: Path) -> list[str] | None:
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


def _saved_resolution(metadata: Mapping[str, str], path: Path, default: int | None = None) -> int:
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


class OnnxModel(DeployedModel):
    """An ONNX Runtime session behind the ``nn.Module`` call interface."""

    def __init__(self, session, config: ModelConfig) -> None:
        super().__init__(config)
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = x.detach().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"images": images})[0])


def _load_onnx(path: Path, resolution: int | None) -> Trained:
    from .export.onnx import onnx_session, read_metadata

    session = onnx_session(path)
    metadata = read_metadata(session)
    if "config" not in metadata:
        raise MobileNetError(f"{path}: not an ONNX file written by mobilenet export/quantize")
    try:
        config = ModelConfig(**json.loads(metadata["config"]))
    except (ValueError, TypeError) as e:  # not JSON, not an object, unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    classes = _saved_classes(metadata, path) or [str(i) for i in range(config.num_classes)]
    res = _saved_resolution(metadata, path)
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    return Trained(OnnxModel(session, config), classes, res, path)


class Pt2Model(DeployedModel):
    """A ``torch.export`` program behind the ``nn.Module`` call interface, run on the CPU
    where it was exported. The program is kept outside the module tree: its module refuses
    ``train()``/``eval()``, which ``evaluate`` calls on the wrapper."""

    def __init__(self, program: nn.Module, config: ModelConfig, resolution: int) -> None:
        super().__init__(config)
        self.__dict__["program"] = program  # not a submodule (see above)
        self.resolution = resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The program's own guards are not run (they are code from the file): check here.
        _check_images(x, self.resolution)
        with torch.no_grad():
            logits = self.program(x.detach().cpu().float().contiguous())
        return logits.to(x.device)  # beside the targets evaluate() moved there


class PteModel(DeployedModel):
    """An ExecuTorch program (``.pte``, float32 or int8) behind the ``nn.Module`` call
    interface. Its memory is planned at export time for at most ``max_batch`` images, so
    a larger batch runs in slices of that size."""

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


def _check_images(x: torch.Tensor, resolution: int) -> None:
    """Refuse a batch an exported program was not made for, before it runs."""
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, resolution, resolution) or x.shape[0] < 1:
        raise MobileNetError(
            f"the exported program takes (batch, 3, {resolution}, {resolution}) images, "
            f"not {tuple(x.shape)}"
        )


def _exported_settings(
    metadata: Mapping[str, str], path: Path, model: str | None, resolution: int | None
) -> tuple[ModelConfig, list[str], int]:
    """The config, class names and input size an exported program (.pt2, .pte) keeps,
    refused when the command line asks for another model or size."""
    try:
        config = ModelConfig(**json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as e:  # missing, not JSON, unknown fields
        raise CheckpointError(f"{path}: metadata 'config' is damaged ({e})") from None
    if model is not None and model != config.name:
        raise MobileNetError(f"{path} holds {config.name}, not {model}")
    classes = _saved_classes(metadata, path) or [str(i) for i in range(config.num_classes)]
    res = _saved_resolution(metadata, path)
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    return config, classes, res


def _load_pt2(path: Path, model: str | None, resolution: int | None) -> Trained:
    from .export.pt2 import read_pt2

    program, metadata = read_pt2(path)
    config, classes, res = _exported_settings(metadata, path, model, resolution)
    return Trained(Pt2Model(program, config, res), classes, res, path)


def _load_pte(path: Path, model: str | None, resolution: int | None) -> Trained:
    """An ExecuTorch program, run on as many threads as PyTorch here (the runtime ignores
    ``OMP_NUM_THREADS`` and would take every core)."""
    from .export.executorch import read_pte, set_pte_threads

    set_pte_threads(torch.get_num_threads())  # before the load: methods keep their pool
    run, metadata = read_pte(path)
    config, classes, res = _exported_settings(metadata, path, model, resolution)
    pte = PteModel(run, config, res, int(metadata["max_batch"]), metadata.get("dtype", ""))
    return Trained(pte, classes, res, path)


def _load_int8(state_dict, metadata: dict[str, str], path: Path, resolution: int | None) -> Trained:
    from .export.int8 import int8_from_checkpoint

    res = _saved_resolution(metadata, path)  # first: the graph is rebuilt at this size
    classes = _saved_classes(metadata, path)
    model = int8_from_checkpoint(state_dict, metadata, str(path))
    if resolution is not None and resolution != res:
        raise MobileNetError(f"{path} takes {res}x{res} images, not {resolution}")
    classes = classes or [str(i) for i in range(model.num_classes)]
    return Trained(model, classes, res, path)


def evaluate_on(
    trained: Trained,
    data: str,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Top-1, top-5 and loss on a folder (class names matched) or a built-in dataset."""
    from .train.distributed import Distributed, resolve_device
    from .train.evaluate import evaluate

    transform = eval_transform(trained.resolution, trained.model.eval_config)
    from .data.shards import eval_set, is_shards

    if data in BUILTIN:
        dataset = builtin_splits(data, transform, transform).val
    elif is_shards(data):
        dataset = eval_set(data, transform, trained.classes)
    elif Path(data).is_dir():
        dataset = ImageFolder(data, transform, classes=trained.classes)
    else:
        raise MobileNetError(
            f"data not found: {data} (an image folder, or one of: {', '.join(BUILTIN)})"
        )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    dist = Distributed(0, 1, 0, resolve_device(device))
    if isinstance(trained.model, DeployedModel):
        return evaluate(trained.model, loader, dist, channels_last=False)
    model = trained.model.to(dist.device, memory_format=torch.channels_last)
    return evaluate(model, loader, dist)


def check_image_files(paths: list[str]) -> None:
    """Refuse every input that is missing or not a regular file before any is read."""
    for path in paths:
        require_regular_file(path)


PREDICT_ENGINES = ("auto", "onnxruntime", "executorch", "eager-fused", "eager")


def engine_candidates(trained: Trained) -> list[str]:
    """The engines ``predict`` can run float weights on here. The int8 engines are not
    among them: quantizing is a change of the model, made only by the user's own file."""
    candidates = ["eager", "eager-fused"]
    if trained.path is None:  # the exporting engines cache their file under its hash
        return candidates
    if available("onnx") and available("onnxruntime"):
        candidates.append("onnxruntime")
    if available("executorch"):
        candidates.append("executorch")
    return candidates


def deployed_engine(model: DeployedModel) -> str:
    """The engine a deployed file (ONNX, int8, torch.export) runs on: itself, as it is."""
    if isinstance(model, OnnxModel):
        from .export.onnx import read_metadata

        int8 = read_metadata(model.session).get("precision") == "int8"
        return "onnxruntime-int8" if int8 else "onnxruntime"
    if isinstance(model, Pt2Model):
        return "pt2"
    if isinstance(model, PteModel):
        return "executorch-int8" if model.precision == "int8" else "executorch"
    return "torch-int8" if isinstance(model, Int8Model) else type(model).__name__


def choose_engine(trained: Trained, engine: str = "auto", batch: int = 1) -> str:
    """The engine ``predict`` runs: a deployed file's own (another asked for is refused);
    the one asked for; or, for ``auto``, the fastest float engine that ``mobilenet bench
    --save`` measured on this machine for this model, width and thread count (the record
    nearest in resolution and in ``batch``, the images classified at once). Without a
    record: ONNX Runtime where the ``deploy`` extra is installed, else eager-fused."""
    if isinstance(trained.model, DeployedModel):
        own = deployed_engine(trained.model)
        if engine not in ("auto", own):  # asked for another: refused rather than ignored
            where = trained.path or "an exported model"
            raise MobileNetError(f"{where} runs on its own engine, {own}: not {engine}")
        return own
    if engine != "auto":
        return engine
    from .engines import fastest, recorded_medians

    candidates = engine_candidates(trained)
    config = trained.model.config
    medians = recorded_medians(
        config.name, config.width_mult, batch, trained.resolution, torch.get_num_threads()
    )
    default = "onnxruntime" if "onnxruntime" in candidates else "eager-fused"
    return fastest(medians, candidates) or default


def inference_engine(trained: Trained, engine: str = "auto") -> nn.Module:
    """The model behind ``predict``, run by ``engine``.

    ``onnxruntime``, the fastest on most CPUs in ``mobilenet bench`` (about 0.35x the
    latency of eager PyTorch for mobilenet_v2 at batch 1), and ``executorch`` (XNNPACK)
    export the weights once and keep the checked file in the cache
    (``$MOBILENET_HOME/onnx`` or ``pte``, keyed by the weights' hash and the resolution);
    they need the ``deploy`` and ``mobile`` extras. ``eager-fused`` folds BatchNorm;
    ``eager`` runs the model as is. ``auto``: see :func:`choose_engine` (batch 1).
    """
    engine = choose_engine(trained, engine)
    model = trained.model
    if isinstance(model, DeployedModel) or engine == "eager":
        return model
    if engine == "eager-fused":
        from .export import prepare_for_inference

        return prepare_for_inference(model, channels_last=False)
    if engine == "onnxruntime":
        from .export.onnx import export_onnx

        for module in ("onnx", "onnxruntime"):
            require(module, "deploy", "the onnxruntime engine")
        return _cached_export(trained, engine, ".onnx", export_onnx)
    if engine == "executorch":
        from .export.executorch import export_pte

        require("executorch", "mobile", "the executorch engine")
        return _cached_export(trained, engine, ".pte", export_pte)
    raise MobileNetError(f"unknown engine {engine!r}; choose from {', '.join(PREDICT_ENGINES)}")


def _cached_export(trained: Trained, engine: str, suffix: str, export) -> nn.Module:
    """The float weights exported by ``export`` into the cache (once per weights file and
    resolution, checked by the export against PyTorch), loaded back."""
    from .paths import cache_dir
    from .weights import sha256_file

    if trained.path is None:
        raise MobileNetError(f"the {engine} engine needs weights loaded from a file")
    name = f"{sha256_file(trained.path)[:16]}-{trained.resolution}{suffix}"
    path = cache_dir() / suffix[1:] / name
    if not path.is_file():
        metadata = {"classes": json.dumps(trained.classes)}
        export(trained.model, path, trained.resolution, metadata=metadata)
    return load_trained(str(path), resolution=trained.resolution).model


@torch.no_grad()
def predict(trained: Trained, images: list[str], top: int = 5, engine: str = "auto") -> list[dict]:
    """The ``top`` classes of each image, with probabilities, and the engine that ran them
    (``auto`` chooses by measurement: the name says which). Unreadable images raise."""
    check_image_files(images)
    transform = eval_transform(trained.resolution, trained.model.eval_config)
    batch = []
    for image in images:
        try:
            batch.append(transform(load_rgb(image)))
        except MobileNetError:  # load_rgb's own one-line refusals
            raise
        except FileNotFoundError:  # removed since it was checked
            raise MobileNetError(f"image not found: {image}") from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise MobileNetError(f"{image}: not a readable image ({e})") from None
    engine = choose_engine(trained, engine, len(images))
    model = inference_engine(trained, engine)
    probs = model(torch.stack(batch)).softmax(1)
    k = min(top, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [
        {
            "image": image,
            "engine": engine,
            "top": [
                {"class": trained.classes[i], "probability": p}
                for p, i in zip(v.tolist(), ix.tolist(), strict=True)
            ],
        }
        for image, v, ix in zip(images, values, indices, strict=True)
    ]
