"""Using a trained classifier: load it with its card (any file format), evaluate it,
classify images on the engine measured fastest here."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from ..card import ModelCard
from ..data import builtin_splits, load_rgb
from ..data.datasets import BUILTIN, ImageFolder
from ..data.imagenet import check_imagenet_folder, folder_classes
from ..data.images import check_image_files
from ..data.published import model_preprocess
from ..deployed import Trained, check_requested, checked_classes
from ..errors import CheckpointError, MobileNetError
from ..formats import LoadRequest, engine_named, engines, format_named, format_of
from ..models.base import DeployedModel
from ..models.pretrained import resolve_weights
from ..models.registry import list_models, model_from_checkpoint, model_task
from ..train.evaluate import require_finite
from ..weights import read_checkpoint, saved_config

__all__ = [
    "choose_engine",
    "evaluate_on",
    "inference_engine",
    "load_trained",
    "predict",
    "predict_engines",
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
    request = LoadRequest(model, width_mult, resolution)
    exported = format_of(path)  # by its suffix
    if exported is not None:
        exported.require(f"reading {path.name}")
        return exported.load(path, request)
    state_dict, metadata = read_checkpoint(path)
    exported = format_of(path, metadata)  # weights of another kind (int8) in safetensors
    if exported is not None:
        return exported.load(path, request)
    try:
        saved = saved_config(metadata)
    except CheckpointError as e:  # its message does not say which file
        raise CheckpointError(f"{path}: {e}") from None
    if saved is not None:  # our own file names its model: a flag may agree, not contradict
        check_requested(path, saved, model, width_mult)
    name = model or (saved["name"] if saved else None)
    if name is None:
        raise MobileNetError(f"{weights} does not say which model it holds: pass --model")
    task = model_task(name)  # an unknown name is refused here
    if name not in list_models():  # the classifiers
        raise MobileNetError(f"{path} holds {name}, a {task} model, not a classifier")
    kwargs = {} if width_mult is None else {"width_mult": width_mult}
    net = model_from_checkpoint(name, state_dict, metadata, str(path), **kwargs).eval()
    card = ModelCard.read(metadata, str(path))
    # Names of another count would be shifted or cut: refused, not replaced by numbers.
    classes = checked_classes(card, path, net.num_classes)
    res = resolution or card.resolution or net.eval_config.resolution
    return Trained(net, classes, res, path, model_preprocess(net, res), card)


def evaluate_on(
    trained: Trained,
    data: str,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Top-1, top-5 and loss on a folder (class names matched) or a built-in dataset."""
    from ..data.shard_sets import eval_set
    from ..data.shards import is_shards
    from ..train.distributed import Distributed, resolve_device
    from ..train.evaluate import evaluate

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


def predict_engines() -> tuple[str, ...]:
    """The engines ``predict --engine`` takes: ``auto`` and every float32 engine that can
    run float weights."""
    return ("auto", *(name for name, e in engines().items() if e.predicts))


def engine_candidates(trained: Trained) -> list[str]:
    """The engines ``predict`` can run float weights on here. The int8 engines are not
    among them: quantizing is a change of the model, made only by the user's own file."""
    found = [name for name, e in engines().items() if e.predicts and e.available()]
    if trained.path is None:  # the exporting engines cache their file under its hash
        return [name for name in found if engines()[name].in_process is not None]
    return found


def deployed_engine(model: DeployedModel) -> str:
    """The engine a deployed file (ONNX, int8, torch.export, ...) runs on: its own."""
    return getattr(model, "engine", type(model).__name__)


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
    from ..formats.records import fastest, recorded_medians

    candidates = engine_candidates(trained)
    config = trained.model.config
    medians = recorded_medians(
        config.name, config.width_mult, batch, trained.resolution, torch.get_num_threads()
    )
    default = max(candidates, key=lambda name: engines()[name].fallback)
    return fastest(medians, candidates) or default


def inference_engine(trained: Trained, engine: str = "auto") -> nn.Module:
    """The model behind ``predict``, run by ``engine``.

    The engines of a file format (``onnxruntime``, the fastest on most CPUs in
    ``mobilenet bench``, ``executorch``, ``litert``, ...) export the weights once and keep
    the checked file in the cache (``$MOBILENET_HOME/FORMAT``, keyed by the weights' hash
    and the resolution); they need their format's extra. ``eager-fused`` folds BatchNorm;
    ``eager`` runs the model as is. ``auto``: see :func:`choose_engine` (batch 1).
    """
    engine = choose_engine(trained, engine)
    model = trained.model
    if isinstance(model, DeployedModel):
        return model
    chosen = engine_named(engine)
    if not chosen.predicts:
        raise MobileNetError(
            f"predict runs float weights on {', '.join(predict_engines())}, not {engine}"
        )
    if chosen.in_process is not None:
        return chosen.in_process(model)
    chosen.require()
    assert chosen.format is not None
    return _cached_export(trained, engine, chosen.format)


def _cached_export(trained: Trained, engine: str, format_name: str) -> nn.Module:
    """The float weights exported in ``format_name`` into the cache (once per weights
    file and resolution, checked by the export against PyTorch), loaded back."""
    from ..paths import cache_dir
    from ..weights import sha256_file

    if trained.path is None:
        raise MobileNetError(f"the {engine} engine needs weights loaded from a file")
    fmt = format_named(format_name)
    name = f"{sha256_file(trained.path)[:16]}-{trained.resolution}{fmt.suffix}"
    path = cache_dir() / fmt.suffix[1:] / name
    if not path.is_file():
        card = trained.model_card()
        fmt.export(trained.model, path, trained.resolution, card)
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
