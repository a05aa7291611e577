import pytest
import torch
from torch import nn
from torchvision.models._utils import _make_divisible as tv_make_divisible

from mobilenet.blocks import DepthwiseSeparable, InvertedResidual
from mobilenet.layers import ConvBNAct, SqueezeExcite, make_divisible


@pytest.mark.parametrize(
    "value", [3.5, 8, 11.2, 12, 16.8, 18, 33.6, 56.0, 88.08, 117.3, 1280 * 1.4]
)
def test_make_divisible_matches_torchvision(value):
    assert make_divisible(value) == tv_make_divisible(value, 8)
    assert make_divisible(value) % 8 == 0
    assert make_divisible(value) >= 0.9 * value


def test_make_divisible_never_below_divisor():
    assert make_divisible(1.0) == 8
    assert make_divisible(3, divisor=4, min_value=16) == 16


def test_hard_swish_and_hard_sigmoid_are_the_papers_formulas():
    x = torch.linspace(-6, 6, 1001)
    relu6 = torch.nn.functional.relu6
    torch.testing.assert_close(nn.Hardswish()(x), x * relu6(x + 3) / 6)
    torch.testing.assert_close(nn.Hardsigmoid()(x), relu6(x + 3) / 6)


def test_depthwise_separable_shapes_and_groups():
    block = DepthwiseSeparable(32, 64, stride=2)
    assert block.dw.conv.groups == 32 == block.dw.conv.out_channels
    assert block.pw.conv.kernel_size == (1, 1)
    assert isinstance(block.pw.act, nn.ReLU6)
    assert block(torch.randn(1, 32, 16, 16)).shape == (1, 64, 8, 8)


@pytest.mark.parametrize(
    ("cin", "exp", "cout", "stride", "has_expand", "residual"),
    [
        (16, 16, 16, 1, False, True),  # V3-Large block 1: exp == in, no expanding 1x1
        (32, 32, 16, 1, False, False),  # V2 t=1 block
        (24, 144, 24, 1, True, True),
        (24, 144, 32, 2, True, False),  # stride 2: never a residual
        (24, 144, 32, 1, True, False),  # channels change: no 1x1 shortcut either
    ],
)
def test_inverted_residual_structure(cin, exp, cout, stride, has_expand, residual):
    block = InvertedResidual(cin, exp, cout, 3, stride)
    assert isinstance(block.expand, ConvBNAct) == has_expand
    assert block.use_residual == residual
    assert block.dw.conv.groups == exp
    assert isinstance(block.project.act, nn.Identity)  # linear bottleneck
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == (3 if has_expand else 2)  # no projection shortcut
    x = torch.randn(1, cin, 8, 8)
    assert block(x).shape == (1, cout, 8 // stride, 8 // stride)


def test_inverted_residual_adds_input_back():
    block = InvertedResidual(16, 64, 16).eval()
    with torch.no_grad():
        block.project.bn.weight.zero_()
        block.project.bn.bias.zero_()
        x = torch.randn(1, 16, 8, 8)
        torch.testing.assert_close(block(x), x)  # F(x) = 0 -> output is x itself


def test_squeeze_excite_sits_after_depthwise_with_quarter_width():
    block = InvertedResidual(24, 72, 40, 5, 2, use_se=True, act=nn.Hardswish)
    names = [name for name, _ in block.named_children()]
    assert names.index("se") == names.index("dw") + 1 < names.index("project")
    assert block.se.fc1.out_channels == make_divisible(72 / 4) == 24
    assert isinstance(block.se.gate, nn.Hardsigmoid)


def test_squeeze_excite_scales_channels():
    se = SqueezeExcite(8, 8)
    x = torch.randn(2, 8, 4, 4)
    scale = se.gate(se.fc2(se.act(se.fc1(x.mean((2, 3), keepdim=True)))))
    torch.testing.assert_close(se(x), x * scale)
    assert ((scale >= 0) & (scale <= 1)).all()
