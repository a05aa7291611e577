"""Test helpers: realistic BatchNorm statistics for output comparisons."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics.

    A freshly initialised network in eval mode shrinks activations towards zero, which
    makes any output comparison meaningless; random statistics of a realistic scale
    (variance near 1, small means) keep activations O(1) so differences show.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


def recalibrate_bn(model: nn.Module, resolution: int = 96, seed: int = 0) -> nn.Module:
    """Set BatchNorm running statistics to those of a random batch (cumulative average).

    Keeps every layer's output near unit scale, so that logits are O(1) and an absolute
    tolerance on them means something; affine parameters are left as they are.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, resolution, resolution, generator=g)
    saved = {}
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            saved[m] = m.momentum
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    for m, momentum in saved.items():
        m.momentum = momentum
    return model.eval()


def unit_scale_logits(model: nn.Module, classifier: nn.Linear, resolution: int = 160) -> nn.Module:
    """Rescale the last layer so logits have unit standard deviation on random images.

    Float32 kernels that sum in different orders differ by a relative ~1e-6; with logits
    near 1, an absolute tolerance such as 1e-4 then means the same thing for every model.
    """
    model.eval()
    with torch.no_grad():
        std = model(torch.randn(4, 3, resolution, resolution)).std()
        classifier.weight /= std
        classifier.bias /= std
    return model
