"""int8 models in PyTorch: post-training and quantization-aware (FX graph mode, x86).

The network is quantized by PyTorch's FX graph mode for the x86 backend (fbgemm/oneDNN
kernels): Conv-BN(-ReLU) fused, int8 weights per output channel, uint8 activations.
h-swish, the squeeze-excite's h-sigmoid gate and multiply, ReLU6 and the residual adds
have quantized kernels, so the whole network runs in int8, with no per-architecture code.
Calibration (the data, the PT2E observers) is :mod:`mobilenet.export.calibration`,
shared with the ONNX, ExecuTorch, LiteRT and OpenVINO int8 files.

* PTQ: observers record activation ranges (histograms) on calibration images.
* QAT: fake quantization in the training graph, a few epochs of fine-tuning (SGD, cosine);
  BatchNorm statistics and then the observers frozen before the end, as torchvision does.

The file format (safetensors, nothing pickled) is :mod:`mobilenet.export.int8_file`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..errors import MobileNetError
from ..models import MobileNet, ModelConfig
from ..models.base import DeployedModel

__all__ = [
    "BACKEND",
    "METHODS",
    "Int8Model",
    "QATConfig",
    "convert_fx_int8",
    "prepare_fx_int8",
    "quantize_model",
    "quantize_torch",
    "x86_backend",
]

BACKEND = "x86"
METHODS = ("ptq", "qat")


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
def x86_backend() -> Iterator[None]:
    """PyTorch's x86 quantized engine for the duration, its deprecation warnings quiet."""
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


def prepare_fx_int8(model: MobileNet, method: str, resolution: int) -> torch.fx.GraphModule:
    """A copy of ``model`` with observers (PTQ) or fake quantization (QAT) for x86."""
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


def convert_fx_int8(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 network of a prepared (and calibrated or fine-tuned) one."""
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepared.eval())


def quantize_torch(
    trained,
    data: str,
    method: str = "ptq",
    calibration_images: int = 512,
    qat: QATConfig | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Int8Model:
    """An int8 :class:`Int8Model` of ``trained`` (a :class:`mobilenet.deployed.Trained`).

    PTQ calibrates on ``calibration_images`` images of ``data`` (all it holds when that is
    fewer: ``progress`` is told, and the model's ``calibration_images`` says how many);
    QAT fine-tunes on all of them for ``qat.epochs`` epochs (``QATConfig()`` by default).
    """
    from .calibration import calibration_batches, calibration_count, calibration_dataset

    dataset = calibration_dataset(trained, data)
    generator = torch.Generator().manual_seed(seed)
    if method == "ptq":
        used = calibration_count(dataset, calibration_images, data, progress)
        batches = calibration_batches(dataset, used, generator)
        return quantize_model(trained.model, batches, trained.resolution)
    with x86_backend():
        prepared = prepare_fx_int8(trained.model, "qat", trained.resolution)
        _finetune(prepared, dataset, qat or QATConfig(), generator, progress)
        net = convert_fx_int8(prepared)
    return Int8Model(net, trained.model.config, "qat")


def quantize_model(
    model: MobileNet, calibration: Iterable[torch.Tensor], resolution: int = 224
) -> Int8Model:
    """Post-training int8 quantization of ``model``, calibrated on batches of images.

    ``calibration`` yields normalised image batches (N, 3, H, W) like those the model was
    trained on; ``resolution`` is the size it will run at.
    """
    with x86_backend():
        prepared = prepare_fx_int8(model, "ptq", resolution)
        seen = 0
        with torch.no_grad():
            for images in calibration:
                prepared(images.contiguous())
                seen += len(images)
        if seen == 0:
            raise MobileNetError("no calibration images")
        net = convert_fx_int8(prepared)
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
