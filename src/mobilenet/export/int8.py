"""int8 models in PyTorch: post-training and quantization-aware (FX graph mode, x86).

The network is quantized by PyTorch's FX graph mode for the x86 backend (fbgemm/oneDNN
kernels): Conv-BN(-ReLU) fused, int8 weights per output channel, uint8 activations.
h-swish, the squeeze-excite's h-sigmoid gate and multiply, ReLU6 and the residual adds
have quantized kernels, so the whole network runs in int8, with no per-architecture code.
Calibration (the data, the PT2E observers) is :mod:`mobilenet.export.calibration`,
shared with the ONNX, ExecuTorch, LiteRT and OpenVINO int8 files.

* PTQ: observers record activation ranges (histograms) on calibration images.
* QAT: fake quantization in the training graph (:func:`prepare_fx_int8`), fine-tuned by
  the training engine (:mod:`mobilenet.classification.qat`), then :func:`convert_fx_int8`.

The file format (safetensors, nothing pickled) is :mod:`mobilenet.export.int8_file`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..blocks import MultiScaleFusionAdapter
from ..errors import MobileNetError
from ..models import MobileNet, ModelConfig
from ..models.base import DeployedModel

__all__ = [
    "BACKEND",
    "METHODS",
    "Int8Model",
    "convert_fx_int8",
    "float_map_lists",
    "prepare_fx_int8",
    "quantize_model",
    "quantize_torch",
    "x86_backend",
]

BACKEND = "x86"
METHODS = ("ptq", "qat")


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
        mapping = float_map_lists(model, get_default_qconfig_mapping(BACKEND))
        return prepare_fx(model.eval(), mapping, example)
    mapping = float_map_lists(model, get_default_qat_qconfig_mapping(BACKEND))
    return prepare_qat_fx(model.train(), mapping, example)


def float_map_lists(model: nn.Module, mapping):
    """``mapping`` with each :class:`~mobilenet.blocks.MultiScaleFusionAdapter` of
    ``model`` (MobileNetV5's) in float but for its FFN: FX puts an observer on a list of
    maps (the adapter's resized inputs, before their concatenation), which takes only a
    tensor. The FFN's 1x1 convs, nearly all of its work, stay int8."""
    for name, module in model.named_modules():
        if isinstance(module, MultiScaleFusionAdapter):
            mapping.set_module_name(name, None)
            mapping.set_module_name(f"{name}.ffn", mapping.global_qconfig)
    return mapping


def convert_fx_int8(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The int8 network of a prepared (and calibrated or fine-tuned) one."""
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(prepared.eval())


def quantize_torch(
    trained,
    data: str,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Int8Model:
    """A post-training int8 :class:`Int8Model` of ``trained`` (a
    :class:`mobilenet.deployed.Trained`), calibrated on ``calibration_images`` images of
    ``data`` (all it holds when that is fewer: ``progress`` is told, and the model's
    ``calibration_images`` says how many). Quantization-aware training is a training run:
    :mod:`mobilenet.classification.qat`."""
    from .calibration import calibration_batches, calibration_count, calibration_dataset

    dataset = calibration_dataset(trained, data)
    generator = torch.Generator().manual_seed(seed)
    used = calibration_count(dataset, calibration_images, data, progress)
    batches = calibration_batches(dataset, used, generator)
    return quantize_model(trained.model, batches, trained.resolution)


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
