"""Using a trained model: load it with its classes, evaluate it, classify images."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from .data import builtin_splits, load_rgb
from .data.datasets import BUILTIN, ImageFolder
from .data.imagenet import check_imagenet_folder, folder_classes
from .data.images import require_regular_file
from .data.published import model_preprocess
from .deployed import (
    OnnxModel,
    Pt2Model,
    PteModel,
    TfliteModel,
    Trained,
    check_requested,
    checked_classes,
    load_int8,
    load_onnx,
    load_pt2,
    load_pte,
    load_tflite,
    saved_resolution,
)
from .errors import CheckpointError, MobileNetError
from .export.int8 import Int8Model, is_int8_checkpoint
from .extras import available, require
from .models.base import DeployedModel
from .models.pretrained import resolve_weights
from .models.registry import model_from_checkpoint, model_task
from .train.evaluate import require_finite
from .weights import read_checkpoint, saved_config

__all__ = [
    "PREDICT_ENGINES",
    "OnnxModel",
    "Pt2Model",
    "PteModel",
    "TfliteModel",
    "Trained",
    "check_image_files",
    "choose_engine",
    "evaluate_on",
    "inference_engine",
    "load_trained",
    "predict",
]


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
        return load_onnx(path, model, width_mult, resolution)
    if path.suffix == ".pt2":
        return load_pt2(path, model, resolution, width_mult)
    if path.suffix == ".pte":
        return load_pte(path, model, resolution, width_mult)
    if path.suffix == ".tflite":
        return load_tflite(path, model, resolution, width_mult)
    state_dict, metadata = read_checkpoint(path)
    if is_int8_checkpoint(metadata):
        return load_int8(state_dict, metadata, path, resolution, model, width_mult)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{path}: {e}") from None
    if saved is not None:  # our own file names its model: a flag may agree, not contradict
        check_requested(path, saved, model, width_mult)
    name = model or (saved["name"] if saved else None)
    if name is None:
        raise MobileNetError(f"{weights} does not say which model it holds: pass --model")
    if model_task(name) != "classification":
        raise MobileNetError(f"{path} holds {name}, a {model_task(name)} model, not a classifier")
    kwargs = {} if width_mult is None else {"width_mult": width_mult}
    net = model_from_checkpoint(name, state_dict, metadata, str(path), **kwargs).eval()
    # Names of another count would be shifted or cut: refused, not replaced by numbers.
    classes = checked_classes(metadata, path, net.num_classes)
    res = resolution or saved_resolution(metadata, path, net.eval_config.resolution)
    return Trained(net, classes, res, path, model_preprocess(net, res))


def evaluate_on(
    trained: Trained,
    data: str,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Top-1, top-5 and loss on a folder (class names matched) or a built-in dataset."""
    from .data.shard_sets import eval_set
    from .data.shards import is_shards
    from .train.distributed import Distributed, resolve_device
    from .train.evaluate import evaluate

    transform = trained.eval_preprocess().transform()
    # An ImageNet model's classes are matched by WordNet id (n01440764/, ...): a folder
    # with some of the 1,000 still gives each image its index among all 1,000.
    classes = folder_classes(trained.classes)
    if data in BUILTIN:
        dataset = builtin_splits(data, transform, transform).val
    elif is_shards(data):
        dataset = eval_set(data, transform, classes)
    elif Path(data).is_dir():
        if classes is not trained.classes:
            check_imagenet_folder(data)
        dataset = ImageFolder(data, transform, classes=classes)
    else:
        raise MobileNetError(
            f"data not found: {data} (an image folder, or one of: {', '.join(BUILTIN)})"
        )
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    dist = Distributed(0, 1, 0, resolve_device(device))
    source = str(trained.path or "the model")
    if isinstance(trained.model, DeployedModel):
        return evaluate(trained.model, loader, dist, channels_last=False, source=source)
    model = trained.model.to(dist.device, memory_format=torch.channels_last)
    return evaluate(model, loader, dist, source=source)


def check_image_files(paths: list[str]) -> None:
    """Refuse every input that is missing or not a regular file before any is read."""
    for path in paths:
        require_regular_file(path)


PREDICT_ENGINES = ("auto", "onnxruntime", "executorch", "litert", "eager-fused", "eager")


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
    if available("litert_torch") and available("ai_edge_litert"):
        candidates.append("litert")
    return candidates


def deployed_engine(model: DeployedModel) -> str:
    """The engine a deployed file (ONNX, int8, torch.export) runs on: itself, as it is."""
    if isinstance(model, OnnxModel):
        from .export.onnx import read_metadata

        int8 = read_metadata(model.session).get("precision") == "int8"
        return "onnxruntime-int8" if int8 else "onnxruntime"
    if isinstance(model, Pt2Model):
        return "pt2"
    if isinstance(model, PteModel):  # and TfliteModel
        return f"{model.engine}-int8" if model.precision == "int8" else model.engine
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
    if engine == "litert":
        from .export.litert import export_tflite

        for module in ("litert_torch", "ai_edge_litert"):
            require(module, "litert", "the litert engine")
        return _cached_export(trained, engine, ".tflite", export_tflite)
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
        metadata = {
            "classes": json.dumps(trained.classes),
            "preprocess": trained.eval_preprocess().to_json(),
        }
        export(trained.model, path, trained.resolution, metadata=metadata)
    return load_trained(str(path), resolution=trained.resolution).model


@torch.no_grad()
def predict(trained: Trained, images: list[str], top: int = 5, engine: str = "auto") -> list[dict]:
    """The ``top`` classes of each image, with probabilities, and the engine that ran them
    (``auto`` chooses by measurement: the name says which). Unreadable images raise."""
    check_image_files(images)
    transform = trained.eval_preprocess().transform()
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
    logits = model(torch.stack(batch))
    require_finite(logits, str(trained.path or "the model"))
    probs = logits.softmax(1)
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
