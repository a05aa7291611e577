"""Inference preparation shared by every engine: BatchNorm folded, channels_last, no grad;
for quantizers that have no integer h-swish, the activations as integer-friendly ops; and
BatchNorm statistics measured on given images."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..blocks import MobileMQA
from ..layers import ConvBNAct

__all__ = [
    "IntegerHardsigmoid",
    "IntegerHardswish",
    "attention_norm_foldable",
    "fold_batchnorm",
    "integer_activations",
    "measure_batchnorm",
    "prepare_for_inference",
]


def measure_batchnorm(model: nn.Module, images: Iterable[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to their plain average over ``images``
    (batches), as training measures them on its data, and return the model in eval mode.
    Only the BatchNorms run in training mode: no dropout, and a detector needs no targets.
    An untrained network's default statistics shrink activations towards 0 layer after
    layer; measured ones keep them unit-scale."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
        m.train()
    with torch.no_grad():
        for batch in images:
            model(batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every conv's BatchNorm into the conv's weights and bias, in place.

    In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
    ``b' = (b - m) * g / sqrt(v + eps) + beta``: exact up to float rounding, and one
    memory pass fewer per layer. A Mobile MQA block's pre-norm, which no conv precedes, is
    folded forward into the query, key and value projections where they read it directly
    (:func:`attention_norm_foldable`).
    """
    for module in model.modules():
        if isinstance(module, ConvBNAct) and isinstance(module.bn, nn.BatchNorm2d):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
        elif isinstance(module, MobileMQA) and attention_norm_foldable(module):
            _fold_attention_norm(module)
    return model


def attention_norm_foldable(block: MobileMQA) -> bool:
    """Whether a Mobile MQA block's pre-norm (V4 Section 4.2: BatchNorm with no conv before
    it) folds exactly into the convs after it: when the query, key and value 1x1
    projections read it directly. Where the keys and values are downsampled first (a
    strided depthwise conv, ``kv_stride`` 2), its zero padding sees the normalised map's
    border, which no change of the conv's weights reproduces: that norm stays, as it does
    where the queries are average-pooled (and BatchNorm'd again) first."""
    attn = block.attn
    readers = (attn.query_down, attn.key_down, attn.value_down)
    return isinstance(block.norm, nn.BatchNorm2d) and all(
        isinstance(m, nn.Identity) for m in readers
    )


def _fold_attention_norm(block: MobileMQA) -> None:
    """Fold the pre-norm ``BN(x) = s * x + t`` into each 1x1 projection ``W`` that reads it:
    ``W (s * x + t) = (W diag(s)) x + W t``, a conv with a bias; the norm becomes the
    identity. Exact up to float rounding, in eval mode (running statistics)."""
    norm, attn = block.norm, block.attn
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    with torch.no_grad():
        for name in ("query", "key", "value"):
            conv: nn.Conv2d = getattr(attn, name)
            weight = conv.weight.detach()
            folded = nn.Conv2d(conv.in_channels, conv.out_channels, 1, bias=True)
            folded = folded.to(weight.device, weight.dtype)
            folded.weight.copy_(weight * scale.view(1, -1, 1, 1))
            bias = weight.flatten(1) @ shift
            folded.bias.copy_(bias if conv.bias is None else bias + conv.bias)
            setattr(attn, name, folded)
    block.norm = nn.Identity()


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
