"""Inference preparation shared by every engine: BatchNorm folded, channels_last, no grad."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..layers import ConvBNAct

__all__ = ["fold_batchnorm", "prepare_for_inference"]


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
