"""Golden numbers from the papers (see the module docstrings of mobilenet.models)."""

import pytest
import torch
from torch import nn

from mobilenet import MobileNetError, cost, create_model
from mobilenet.blocks import DepthwiseSeparable
from mobilenet.layers import ConvBNAct


@pytest.mark.parametrize(
    ("name", "params", "madds_m"),
    [
        ("mobilenet_v1", 4_231_976, 568.7),
        ("mobilenet_v2", 3_504_872, 300.8),
        ("mobilenet_v3_large", 5_483_032, 216.6),
        ("mobilenet_v3_small", 2_542_856, 56.5),
    ],
)
def test_golden_params_and_madds_at_224(name, params, madds_m):
    c = cost(create_model(name))
    assert c.params == params
    assert round(c.madds / 1e6, 1) == madds_m


@pytest.mark.parametrize(("width", "paper_m"), [(0.75, 325), (0.5, 149), (0.25, 41)])
def test_v1_table_6_width_multiplier(width, paper_m):
    madds = cost(create_model("mobilenet_v1", width_mult=width)).madds / 1e6
    assert madds == pytest.approx(paper_m, rel=0.03)


@pytest.mark.parametrize(("resolution", "paper_m"), [(192, 418), (160, 290), (128, 186)])
def test_v1_table_7_resolution_multiplier(resolution, paper_m):
    c = cost(create_model("mobilenet_v1"), resolution=resolution)
    assert c.madds / 1e6 == pytest.approx(paper_m, rel=0.01)
    assert c.params == 4_231_976  # rho changes MAdds only


def test_v1_table_2_shares_by_layer_type():
    c = cost(create_model("mobilenet_v1"))
    madds = {k: 100 * v["madds"] / c.madds for k, v in c.by_type.items()}
    assert madds["conv1x1"] == pytest.approx(94.86, abs=0.1)
    assert madds["depthwise"] == pytest.approx(3.06, abs=0.1)
    assert madds["conv"] == pytest.approx(1.91, abs=0.1)  # printed 1.19: a digit swap
    assert madds["linear"] == pytest.approx(0.18, abs=0.1)
    # The paper's parameter shares count conv and FC weights (no BatchNorm, no FC bias).
    weights = {k: 0 for k in c.by_type}
    model = create_model("mobilenet_v1")
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            weights["linear" if isinstance(m, nn.Linear) else _kind(m)] += m.weight.numel()
    total = sum(weights.values())
    assert 100 * weights["conv1x1"] / total == pytest.approx(74.59, abs=0.1)
    assert 100 * weights["linear"] / total == pytest.approx(24.33, abs=0.1)
    assert 100 * weights["depthwise"] / total == pytest.approx(1.06, abs=0.1)


def _kind(conv: nn.Conv2d) -> str:
    if conv.groups == conv.in_channels > 1:
        return "depthwise"
    return "conv1x1" if conv.kernel_size == (1, 1) else "conv"


def test_v1_table_4_conv_mobilenet():
    c = cost(create_model("mobilenet_v1_conv"))
    assert c.params / 1e6 == pytest.approx(29.3, abs=0.05)
    assert c.madds / 1e6 == pytest.approx(4866, rel=0.001)


def test_v1_table_3_single_layer():
    # One 14x14x512 -> 512 layer: full conv 462M MAdds / 2.36M params, separable 52.3M / 0.27M.
    class One(nn.Module):
        def __init__(self, layer: nn.Module) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x[:, :1].expand(-1, 512, -1, -1))

    full = cost(One(ConvBNAct(512, 512, 3)), resolution=14)
    separable = cost(One(DepthwiseSeparable(512, 512)), resolution=14)
    assert full.madds / 1e6 == pytest.approx(462, rel=0.005)
    assert full.by_type["conv"]["params"] / 1e6 == pytest.approx(2.36, abs=0.005)
    assert separable.madds / 1e6 == pytest.approx(52.3, rel=0.005)
    weights = separable.by_type["conv1x1"]["params"] + separable.by_type["depthwise"]["params"]
    assert weights / 1e6 == pytest.approx(0.27, abs=0.005)


def test_v3_table_3_other_widths_and_minimal():
    large_075 = cost(create_model("mobilenet_v3_large", width_mult=0.75))
    assert large_075.madds / 1e6 == pytest.approx(155, rel=0.01)
    assert large_075.params / 1e6 == pytest.approx(4.0, abs=0.05)
    small_075 = cost(create_model("mobilenet_v3_small", width_mult=0.75))
    assert small_075.madds / 1e6 == pytest.approx(44, rel=0.02)
    assert small_075.params / 1e6 == pytest.approx(2.0, abs=0.05)
    large_min = cost(create_model("mobilenet_v3_large_minimal"))
    assert large_min.madds / 1e6 == pytest.approx(209, rel=0.01)
    assert large_min.params / 1e6 == pytest.approx(3.9, abs=0.05)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small"])
def test_breakdown_sums_to_totals(name):
    model = create_model(name, width_mult=0.5, num_classes=10)
    c = cost(model, resolution=160)
    assert sum(v["params"] for v in c.by_type.values()) == c.params
    assert c.params == sum(p.numel() for p in model.parameters())
    assert sum(v["madds"] for v in c.by_type.values()) == c.madds
    assert sum(layer.madds for layer in c.layers) == c.madds
    assert c.by_type["norm"]["madds"] == 0


def test_activation_memory_v1_vs_v2():
    v1 = cost(create_model("mobilenet_v1"))
    v2 = cost(create_model("mobilenet_v2"))
    # V1's largest tensor is 112x112x64; V2's the first 6x expansion, 112x112x96.
    assert v1.largest_activation_bytes == 112 * 112 * 64 * 4
    assert v2.largest_activation_bytes == 112 * 112 * 96 * 4
    # In a plain forward pass a conv's output and its BatchNorm's output coexist.
    assert v1.peak_activation_bytes == 2 * 112 * 112 * 64 * 4
    assert v2.peak_activation_bytes >= 2 * v2.largest_activation_bytes


def test_peak_counts_the_residual_shortcut():
    # A stride-1 block with a residual keeps its input alive while computing the output.
    from mobilenet.blocks import InvertedResidual

    class Wrap(nn.Module):
        def __init__(self, residual: bool) -> None:
            super().__init__()
            self.block = InvertedResidual(16, 16, 16 if residual else 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x[:, :1].expand(-1, 16, -1, -1).contiguous())

    hw = 32 * 32 * 4
    with_res = cost(Wrap(True), resolution=32)
    without = cost(Wrap(False), resolution=32)
    # dw conv out + dw bn out + shortcut input (16 ch each) at the peak.
    assert with_res.peak_activation_bytes == 3 * 16 * hw
    assert without.peak_activation_bytes == 2 * 24 * hw  # project conv + bn, input freed


def test_bad_resolution():
    with pytest.raises(MobileNetError, match=">= 32"):
        cost(create_model("mobilenet_v2"), resolution=16)
