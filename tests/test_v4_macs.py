"""MobileNetV4's multiply-adds against timm's network, counted by PyTorch itself.

``torch.utils.flop_counter.FlopCounterMode`` counts the convolutions and matrix products
timm's model actually runs (2 FLOPs per multiply-add). It does not count the products
inside PyTorch's fused attention on the CPU, which our cost model reports as the layer
type ``attention`` (3-5% of the hybrids' total): without them the two counts must agree
exactly, for every V4 model."""

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from mobilenet import cost

# ours, timm's; at 128 (the counts scale with the resolution, and the test stays fast)
PAIRS = [
    ("mobilenet_v4_conv_small", "mobilenetv4_conv_small"),
    ("mobilenet_v4_conv_medium", "mobilenetv4_conv_medium"),
    ("mobilenet_v4_conv_large", "mobilenetv4_conv_large"),
    ("mobilenet_v4_hybrid_medium", "mobilenetv4_hybrid_medium"),
    ("mobilenet_v4_hybrid_large", "mobilenetv4_hybrid_large"),
]
RES = 128


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_madds_equal_timms_counted_by_pytorch(ours, theirs):
    model = timm.create_model(theirs).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, 3, RES, RES))
    timm_madds = counter.get_total_flops() // 2
    ours_cost = cost(ours, resolution=RES)
    attention = ours_cost.by_type["attention"]["madds"]
    assert ours_cost.madds - attention == timm_madds
    assert (attention > 0) == ("hybrid" in ours)
