"""Inference preparation shared by every engine: BatchNorm folded, channels_last, no grad;
and, for quantizers that have no integer h-swish, the activations as integer-friendly ops."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..layers import ConvBNAct

__all__ = [
    "IntegerHardsigmoid",
    "IntegerHardswish",
    "fold_batchnorm",
    "integer_activations",
    "prepare_for_inference",
]


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every conv's BatchNorm into the conv's weights and bias, in place.

    In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
    ``b' = (b - m) * g / sqrt(v + eps) + beta``: exact up to float rounding, and one
    memory pass fewer per layer.
    """
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    return model


def prepare_for_inference(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` for inference: eval mode, BatchNorm folded, no gradients,
    and (by default) channels_last weights, which the CPU convolution kernels prefer."""
    prepared = fold_batchnorm(copy.deepcopy(model).eval())
    for p in prepared.parameters():
        p.requires_grad_(False)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared


class IntegerHardsigmoid(nn.Module):
    """h-sigmoid as ``hardtanh(x + 3, 0, 6) * (1 / 6)`` (V3 Section 5.2: ``ReLU6(x + 3) / 6``):
    the same function, in operators every int8 backend has (add, clamp, multiply)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardtanh(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)


class IntegerHardswish(nn.Module):
    """h-swish as ``x * hardtanh(x + 3, 0, 6) * (1 / 6)``, in add, clamp and multiply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardtanh(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)


def integer_activations(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Hardswish`` and ``nn.Hardsigmoid`` of ``model`` in place by
    :class:`IntegerHardswish` / :class:`IntegerHardsigmoid`.

    A PT2E quantizer that annotates add, multiply, clamp and mean but not h-swish (XNNPACK's)
    then quantizes MobileNetV3 end to end: no operator is left in float between a
    dequantize and a quantize, as an integer-only accelerator requires."""
    for name, child in model.named_children():
        if isinstance(child, nn.Hardswish):
            setattr(model, name, IntegerHardswish())
        elif isinstance(child, nn.Hardsigmoid):
            setattr(model, name, IntegerHardsigmoid())
        else:
            integer_activations(child)
    return model
