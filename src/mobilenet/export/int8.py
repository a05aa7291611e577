"""int8 models in PyTorch: post-training and quantization-aware, saved as safetensors.

The network is quantized by PyTorch's FX graph mode for the x86 backend (fbgemm/oneDNN
kernels): Conv-BN(-ReLU) fused, int8 weights per output channel, uint8 activations.
h-swish, the squeeze-excite's h-sigmoid gate and multiply, ReLU6 and the residual adds
have quantized kernels, so the whole network runs in int8, with no per-architecture code.
Calibration (the data, the PT2E observers) is shared with the ExecuTorch and LiteRT exports.

* PTQ: observers record activation ranges (histograms) on calibration images.
* QAT: fake quantization in the training graph, a few epochs of fine-tuning (SGD, cosine);
  BatchNorm statistics and then the observers frozen before the end, as torchvision does.

A quantized PyTorch model is usually saved by pickling the module or a TorchScript
trace. Here it is a safetensors file instead: every quantized tensor is stored as its
integer values plus its scale(s) and zero point(s), and loading rebuilds the same
quantized graph from the model's config and restores those tensors exactly, so a
reloaded model gives bit-identical outputs and nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import CheckpointError, MobileNetError
from ..fileio import write_bytes
from ..models import MobileNet, ModelConfig, create_model
from ..models.base import DeployedModel

__all__ = [
    "METHODS",
    "Int8Model",
    "QATConfig",
    "calibrated_export",
    "calibration_batches",
    "calibration_count",
    "calibration_dataset",
    "int8_from_checkpoint",
    "is_int8_checkpoint",
    "observe",
    "quantize_model",
    "quantize_torch",
    "save_int8",
]

BACKEND = "x86"
METHODS = ("ptq", "qat")
_QDTYPES = {str(d): d for d in (torch.qint8, torch.quint8, torch.qint32)}


@dataclass(frozen=True)
class QATConfig:
    """Quantization-aware fine-tuning from trained float weights."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # SGD with momentum, cosine-decayed to 0 over the fine-tuning
    momentum: float = 0.9
    weight_decay: float = 1e-5
    freeze_bn_epoch: int = 1  # BatchNorm statistics frozen from this epoch (0-based) on
    freeze_observer_epoch: int = 2  # quantization ranges frozen from this epoch on


class Int8Model(DeployedModel):
    """A quantized network with its config, like a :class:`MobileNet` for inference.

    ``calibration_images`` is how many images PTQ calibrated on (None after QAT, or when
    a loaded file does not say): fewer than asked when the data holds fewer.
    """

    def __init__(
        self,
        net: nn.Module,
        config: ModelConfig,
        method: str,
        calibration_images: int | None = None,
    ) -> None:
        super().__init__(config)
        self.net = net
        self.method = method
        self.calibration_images = calibration_images

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x.contiguous())


@contextmanager
def _x86_backend() -> Iterator[None]:
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise MobileNetError(
            f"int8 PyTorch models need the {BACKEND} quantized backend, which this build "
            f"of PyTorch lacks (it has: {', '.join(torch.backends.quantized.supported_engines)})"
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = BACKEND
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization announces its future move to torchao on every call.
            warnings.filterwarnings("ignore", module=r"torch\.ao\.")
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            yield
    finally:
        torch.backends.quantized.engine = previous


def _prepare(model: MobileNet, method: str, resolution: int) -> torch.fx.GraphModule:
    from torch.ao.quantization import (
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

    if method not in METHODS:
        raise MobileNetError(f"unknown quantization method {method!r}; choose from ptq, qat")
    example = (torch.zeros(1, 3, resolution, resolution),)
    model = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format)
    if method == "ptq":
        return prepare_fx(model.eval(), get_default_qconfig_mapping(BACKEND), example)
    return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping(BACKEND), example)


def _convert(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepared.eval())


# --------------------------------------------------------------------------- quantize


def calibration_dataset(trained, data: str) -> Dataset:
    """The images to calibrate or fine-tune on, preprocessed as ``eval`` does (ranges
    observed on other inputs would not fit): a built-in dataset's training split (never
    the held-out one), or a folder read with the model's class names."""
    from ..data.datasets import BUILTIN, ImageFolder, builtin_splits
    from ..data.imagenet import folder_classes

    transform = trained.eval_preprocess().transform()
    if data in BUILTIN:
        return builtin_splits(data, transform, transform).train
    if Path(data).is_dir():
        return ImageFolder(data, transform, classes=folder_classes(trained.classes))
    raise MobileNetError(
        f"data not found: {data} (an image folder, or one of: {', '.join(BUILTIN)})"
    )


def calibration_batches(
    dataset: Dataset, images: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Batches of 32 from ``images`` images of ``dataset`` drawn at random (all of them
    when it holds fewer: see :func:`calibration_count`)."""
    order = torch.randperm(len(dataset), generator=generator)
    subset = Subset(dataset, order[: min(images, len(dataset))].tolist())
    for batch, _ in DataLoader(subset, batch_size=32):
        yield batch


def calibration_count(
    dataset: Dataset,
    images: int,
    data: str = "the data",
    progress: Callable[[str], None] | None = None,
) -> int:
    """How many images calibration uses: ``images``, or all there are (``progress`` is told)."""
    available = len(dataset)  # type: ignore[arg-type]
    if available == 0:
        raise MobileNetError(f"no calibration images in {data}")
    if available < images and progress:
        progress(f"{data} holds {available} images: calibrating on all {available}")
    return min(images, available)


def observe(observed: torch.nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, torch.Tensor]:
    """PT2E observers run over ``batches``: the images seen, and the first three."""
    seen, first = 0, None
    for batch in batches:
        with torch.no_grad():
            observed(batch)
        seen, first = seen + batch.shape[0], batch[:3] if first is None else first
    if first is None:
        raise MobileNetError("int8 calibration needs at least one image")
    return seen, first


def calibrated_export(
    export_int8: Callable[..., float],
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[int, float]:
    """``export_int8`` of ``trained`` calibrated on ``calibration_images`` random images of
    ``data`` (all, when fewer: ``progress`` is told); the images used, the max abs diff."""
    dataset = calibration_dataset(trained, data)
    used = calibration_count(dataset, calibration_images, data, progress)
    batches = calibration_batches(dataset, used, torch.Generator().manual_seed(seed))
    classes, preprocess = json.dumps(trained.classes), trained.eval_preprocess().to_json()
    metadata = {"classes": classes, "preprocess": preprocess}  # as it was calibrated
    return used, export_int8(trained.model, batches, out, trained.resolution, metadata)


def quantize_torch(
    trained,
    data: str,
    method: str = "ptq",
    calibration_images: int = 512,
    qat: QATConfig | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Int8Model:
    """An int8 :class:`Int8Model` of ``trained`` (a :class:`mobilenet.inference.Trained`).

    PTQ calibrates on ``calibration_images`` images of ``data`` (all it holds when that is
    fewer: ``progress`` is told, and the model's ``calibration_images`` says how many);
    QAT fine-tunes on all of them for ``qat.epochs`` epochs (``QATConfig()`` by default).
    """
    dataset = calibration_dataset(trained, data)
    generator = torch.Generator().manual_seed(seed)
    if method == "ptq":
        used = calibration_count(dataset, calibration_images, data, progress)
        batches = calibration_batches(dataset, used, generator)
        return quantize_model(trained.model, batches, trained.resolution)
    with _x86_backend():
        prepared = _prepare(trained.model, "qat", trained.resolution)
        _finetune(prepared, dataset, qat or QATConfig(), generator, progress)
        net = _convert(prepared)
    return Int8Model(net, trained.model.config, "qat")


def quantize_model(
    model: MobileNet, calibration: Iterable[torch.Tensor], resolution: int = 224
) -> Int8Model:
    """Post-training int8 quantization of ``model``, calibrated on batches of images.

    ``calibration`` yields normalised image batches (N, 3, H, W) like those the model was
    trained on; ``resolution`` is the size it will run at.
    """
    with _x86_backend():
        prepared = _prepare(model, "ptq", resolution)
        seen = 0
        with torch.no_grad():
            for images in calibration:
                prepared(images.contiguous())
                seen += len(images)
        if seen == 0:
            raise MobileNetError("no calibration images")
        net = _convert(prepared)
    return Int8Model(net, model.config, "ptq", calibration_images=seen)


def _finetune(
    model: torch.fx.GraphModule,
    dataset: Dataset,
    cfg: QATConfig,
    generator: torch.Generator,
    progress: Callable[[str], None] | None,
) -> None:
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization import disable_observer

    if cfg.epochs <= 0 or cfg.batch_size <= 0 or not cfg.lr > 0:
        raise MobileNetError(f"invalid QAT settings: {cfg}")
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator, drop_last=True
    )
    if len(loader) == 0:
        raise MobileNetError(f"{len(dataset)} images: fewer than one QAT batch of {cfg.batch_size}")
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    total = cfg.epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
    )
    for epoch in range(cfg.epochs):
        model.train()
        if epoch >= cfg.freeze_bn_epoch:
            model.apply(freeze_bn_stats)
        if epoch >= cfg.freeze_observer_epoch:
            model.apply(disable_observer)
        loss_sum = correct = seen = 0
        for images, targets in loader:
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
            if not torch.isfinite(loss):
                raise MobileNetError(f"QAT loss became {loss.item()} at epoch {epoch + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
        if progress:
            progress(
                f"QAT epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / seen:.4f}, "
                f"train top-1 {100 * correct / seen:.2f}%"
            )


# --------------------------------------------------------------------------- save / load

FORMAT = "mobilenet-int8"


def save_int8(model: Int8Model, path: str | Path, classes: list[str], resolution: int) -> Path:
    """Write an int8 model as sealed safetensors (integer values, scales, zero points)."""
    from ..weights import sealed_safetensors

    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for key, value in model.net.state_dict().items():
        _flatten(key, value, tensors, kinds)
    metadata = {
        "format": FORMAT,
        "precision": "int8",
        "quantization": f"{BACKEND}-{model.method}",
        "config": json.dumps(model.config.to_dict()),
        "classes": json.dumps(classes),
        "resolution": str(resolution),
        "kinds": json.dumps(kinds),
    }
    if model.calibration_images is not None:  # provenance: what the ranges were measured on
        metadata["calibration_images"] = str(model.calibration_images)
    path = Path(path)
    # Serialised in memory first: safetensors' own writer reports no error on a full disk.
    write_bytes(path, sealed_safetensors(tensors, metadata))
    return path


def is_int8_checkpoint(metadata: dict[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def int8_from_checkpoint(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str
) -> Int8Model:
    """Rebuild the quantized graph from the stored config and restore its tensors."""
    try:
        config = ModelConfig(**json.loads(metadata["config"]))
        method = metadata["quantization"].rsplit("-", 1)[1]
        resolution = int(metadata["resolution"])
        kinds = json.loads(metadata["kinds"])
        if resolution < 1:
            raise ValueError(f"resolution {resolution}")
        if method not in METHODS:
            raise ValueError(f"quantization {metadata['quantization']!r}")
        if not isinstance(kinds, dict):
            raise TypeError("kinds is not a JSON object")
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{source}: damaged int8 model metadata ({e})") from None
    model = create_model(
        config.name,
        width_mult=config.width_mult,
        num_classes=config.num_classes,
        dropout=config.dropout,
    )
    model.set_bn_eps(config.bn_eps)
    with _x86_backend():
        net = _convert(_prepare(model, method, resolution))
        try:
            state = OrderedDict(
                (key, _unflatten(key, kinds, tensors)) for key in kinds if "#" not in key
            )
            # Quantized modules read their tensors by the state-dict version of each module
            # (kept in ``_metadata``); the rebuilt network has the same modules and versions.
            state._metadata = net.state_dict()._metadata  # type: ignore[attr-defined]
            net.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"{source}: the int8 tensors do not fit {config.name} ({first})"
            ) from None
    calibrated = metadata.get("calibration_images", "")
    return Int8Model(net, config, method, int(calibrated) if calibrated.isdigit() else None)


def _flatten(key: str, value: Any, out: dict[str, torch.Tensor], kinds: dict[str, str]) -> None:
    if value is None:
        kinds[key] = "none"
    elif isinstance(value, torch.dtype):
        kinds[key] = f"dtype:{value}"
    elif isinstance(value, tuple | list):
        kinds[key] = f"tuple:{len(value)}"
        for i, item in enumerate(value):
            _flatten(f"{key}#{i}", item, out, kinds)
    elif isinstance(value, torch.Tensor) and value.is_quantized:
        out[key] = value.int_repr().contiguous()
        if value.qscheme() == torch.per_tensor_affine:
            kinds[key] = f"qtensor:{value.dtype}"
            out[f"{key}#scale"] = torch.tensor([value.q_scale()], dtype=torch.float64)
            out[f"{key}#zero_point"] = torch.tensor([value.q_zero_point()])
        elif value.qscheme() == torch.per_channel_affine:
            kinds[key] = f"qchannel:{value.dtype}:{value.q_per_channel_axis()}"
            out[f"{key}#scale"] = value.q_per_channel_scales().contiguous()
            out[f"{key}#zero_point"] = value.q_per_channel_zero_points().contiguous()
        else:
            raise MobileNetError(f"{key}: quantization scheme {value.qscheme()} not supported")
    elif isinstance(value, torch.Tensor):
        kinds[key] = "tensor"
        out[key] = value.detach().contiguous().clone()
    else:
        raise MobileNetError(f"{key}: cannot store a {type(value).__name__}")


def _unflatten(key: str, kinds: dict[str, str], tensors: dict[str, torch.Tensor]) -> Any:
    kind = kinds[key]
    name, _, rest = kind.partition(":")
    if name == "none":
        return None
    if name == "dtype":
        return _QDTYPES[rest]
    if name == "tuple":
        return tuple(_unflatten(f"{key}#{i}", kinds, tensors) for i in range(int(rest)))
    if name == "tensor":
        return tensors[key]
    if name == "qtensor":
        scale, zero_point = tensors[f"{key}#scale"], tensors[f"{key}#zero_point"]
        return torch._make_per_tensor_quantized_tensor(
            tensors[key], float(scale[0]), int(zero_point[0])
        )
    if name == "qchannel":
        axis = int(rest.rsplit(":", 1)[1])
        return torch._make_per_channel_quantized_tensor(
            tensors[key], tensors[f"{key}#scale"], tensors[f"{key}#zero_point"], axis
        )
    raise CheckpointError(f"unknown stored kind {kind!r} for {key}: not an int8 file of ours")
