"""Inference preparation shared by every engine: BatchNorm folded, channels_last, no grad;
for quantizers that have no integer h-swish, the activations as integer-friendly ops; for
the phone runtimes' delegates, RMS norms and attention in the ops they lower; and
BatchNorm statistics measured on given images."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..blocks import MobileMQA
from ..layers import ConvBNAct, DotProductAttention, GELUTanh, RmsNorm2d, SamePad, same_pad

__all__ = [
    "ChannelMeanRmsNorm2d",
    "ConcatSamePad",
    "IntegerHardsigmoid",
    "IntegerHardswish",
    "MatmulAttention",
    "TanhFormulaGELU",
    "attention_norm_foldable",
    "delegable_forms",
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


class ChannelMeanRmsNorm2d(nn.Module):
    """:class:`~mobilenet.layers.RmsNorm2d` with its mean over the channels written as a
    1x1 convolution to one channel (weights ``1 / C``): the same function (the sum in
    another order, ~1e-7 relative), in an op XNNPACK and LiteRT lower. Their mean
    reduces the spatial axes only, so a channel mean is left to ExecuTorch's portable
    kernels, each one a break between two delegated partitions."""

    def __init__(self, norm: RmsNorm2d) -> None:
        super().__init__()
        channels = norm.weight.numel()
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone(), requires_grad=False)
        self.mean = nn.Conv2d(channels, 1, 1, bias=False)
        self.mean.to(norm.weight.device, norm.weight.dtype)
        with torch.no_grad():
            self.mean.weight.fill_(1.0 / channels)
        self.mean.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(self.mean(x * x) + self.eps)
        return x * self.weight.reshape(1, -1, 1, 1)


class MatmulAttention(nn.Module):
    """:class:`~mobilenet.layers.DotProductAttention` as two batched matrix products and
    a softmax: PyTorch's fused kernel exports as a masked softmax (``where``, ``any``,
    ``full_like``) that XNNPACK does not lower, and ``matmul`` of 4-D tensors as copies
    (``expand``) around ``bmm``. With one shared key/value head (multi-query attention) the
    query heads are stacked along the sequence, so no key or value is copied per head."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        positions, value_dim = k.shape[2], v.shape[3]
        q = q * dim**-0.5
        if k.shape[1] == 1:  # [B, heads * L, d] against [B, P, d]
            q = q.reshape(batch, heads * length, dim)
            k, v = k.reshape(batch, positions, dim), v.reshape(batch, positions, value_dim)
        else:  # [B * heads, L, d] against [B * heads, P, d]
            q = q.reshape(batch * heads, length, dim)
            k = k.reshape(batch * heads, positions, dim)
            v = v.reshape(batch * heads, positions, value_dim)
        out = torch.bmm(torch.bmm(q, k.transpose(1, 2)).softmax(-1), v)
        return out.reshape(batch, heads, length, value_dim)


class TanhFormulaGELU(nn.Module):
    """GELU with the tanh approximation written out, ``0.5 x (1 + tanh(sqrt(2 / pi) (x +
    0.044715 x^3)))`` (:class:`~mobilenet.layers.GELUTanh`, MobileNetV5's activation).
    ExecuTorch's XNNPACK delegate lowers ``gelu`` without looking at ``approximate`` and
    computes the exact (erf) GELU, up to 5e-4 off at each activation: through
    MobileNetV5-300M's 130 activations, 1e-3 of the output's scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + torch.tanh(inner))


class ConcatSamePad(nn.Module):
    """:class:`~mobilenet.layers.SamePad` (TensorFlow's SAME zero padding) as rows and
    columns of zeros concatenated to the map: the same tensor, without a PAD op. In an
    int8 graph litert-torch moves a PAD to NHWC with its padding left on the NCHW axes
    where the padded map has other readers (a Mobile MQA block's normalised input, read
    by the query projection and by the strided key and value downsamplers), and cannot
    convert it; a concatenation it moves right."""

    def __init__(self, pad: SamePad) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation = pad.kernel_size, pad.stride, pad.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right, top, bottom = same_pad(x.shape, self.kernel_size, self.stride, self.dilation)
        x = _zeros_around(x, top, bottom, dim=2)
        return _zeros_around(x, left, right, dim=3)


def _zeros_around(x: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    """``x`` with ``before`` and ``after`` slices of zeros along ``dim``."""
    parts = []
    for count, at_end in ((before, False), (after, True)):
        if count:
            shape = list(x.shape)
            shape[dim] = count
            parts.append((at_end, x.new_zeros(shape)))
    if not parts:
        return x
    ahead = [z for at_end, z in parts if not at_end]
    behind = [z for at_end, z in parts if at_end]
    return torch.cat([*ahead, x, *behind], dim=dim)


def delegable_forms(
    model: nn.Module, norms: bool = True, gelus: bool = True, pads: bool = False
) -> nn.Module:
    """Replace, in place, every :class:`~mobilenet.layers.DotProductAttention` of
    ``model`` by :class:`MatmulAttention`, every :class:`~mobilenet.layers.RmsNorm2d` by
    :class:`ChannelMeanRmsNorm2d` (``norms``) and every :class:`~mobilenet.layers.GELUTanh`
    by :class:`TanhFormulaGELU` (``gelus``): the same functions, in ops the phone runtimes
    lower whole and right.

    ExecuTorch needs all three: left as they are, MobileNetV5-300M's attention blocks and
    RMS norms cut its XNNPACK graph into ~90 delegated pieces joined by portable kernels
    (minutes more to lower, slower to run), and its GELUs compute the erf GELU. LiteRT
    needs the attention (and, in an int8 graph, ``pads``: every
    :class:`~mobilenet.layers.SamePad` as a :class:`ConcatSamePad`) only: litert-torch
    lowers MobileNetV5's multi-query attention
    (one key/value head for 12 or 16 query heads) to a program whose output is 30% to 60%
    of its scale off PyTorch's (random weights at width 0.05), and the matrix products
    to one that agrees to 3e-6; its MEAN and GELU ops are right, and faster than the
    written-out forms."""
    for name, child in model.named_children():
        if isinstance(child, DotProductAttention):
            setattr(model, name, MatmulAttention())
        elif norms and isinstance(child, RmsNorm2d):
            setattr(model, name, ChannelMeanRmsNorm2d(child))
        elif gelus and isinstance(child, GELUTanh):
            setattr(model, name, TanhFormulaGELU())
        elif pads and isinstance(child, SamePad):
            setattr(model, name, ConcatSamePad(child))
        else:
            delegable_forms(child, norms, gelus, pads)
    return model
