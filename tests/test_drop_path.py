"""Stochastic depth ("drop path") of the residual blocks: the layer, the blocks, the
authors' per-block schedule, and that it leaves evaluation and exported files alone."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import stochastic_depth

from mobilenet import MobileNetError, create_model
from mobilenet.blocks import (
    FusedInvertedBottleneck,
    InvertedResidual,
    MobileMQA,
    UniversalInvertedBottleneck,
)
from mobilenet.export import export_onnx, onnx_session
from mobilenet.layers import DropPath

from .helpers import randomize_bn, recalibrate_bn

RATE = 0.2


def test_drop_path_is_the_identity_in_eval_and_at_rate_zero():
    x = torch.randn(64, 8, 4, 4)
    layer = DropPath(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)
    assert "p=0.5" in repr(layer)
    assert not list(layer.parameters()) and not list(layer.buffers())


def test_drop_path_zeroes_whole_samples_at_rate_p_and_scales_the_rest():
    p, n = 0.3, 20_000
    x = torch.rand(n, 3, 2, 2) + 0.5  # no zero anywhere: a zero means a dropped sample
    layer = DropPath(p).train()
    torch.manual_seed(0)
    out = layer(x)
    dropped = (out == 0).flatten(1).all(1)
    kept = ~dropped
    # every sample is dropped whole or kept whole, kept ones scaled by 1 / (1 - p)
    assert not (out[kept] == 0).any()
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    # the dropped share is p within 5 standard deviations of a binomial share
    share = dropped.float().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)
    # the same draws as the field's implementation
    torch.manual_seed(0)
    assert torch.equal(out, stochastic_depth(x, p, mode="row", training=True))


def _blocks(rate: float) -> list[nn.Module]:
    return [
        InvertedResidual(16, 64, 16, 3, 1, use_se=True, act=nn.Hardswish, drop_path=rate),
        UniversalInvertedBottleneck(16, 64, 16, 3, 5, layer_scale=0.5, drop_path=rate),
        FusedInvertedBottleneck(16, 64, 16, drop_path=rate),
        MobileMQA(16, 16, heads=2, key_dim=8, kv_stride=2, layer_scale=0.5, drop_path=rate),
    ]


@pytest.mark.parametrize("index", range(4), ids=["ir", "uib", "fused", "mqa"])
def test_a_block_drops_its_branch_never_its_shortcut(index):
    p = 0.5
    block = _blocks(p)[index].train()
    plain = copy.deepcopy(block)
    plain.drop_path = None  # the same block without stochastic depth
    x = torch.randn(64, 16, 8, 8)
    with torch.no_grad():
        branch = plain(x) - x
        out = block(x)
    dropped = (out == x).flatten(1).all(1)
    assert 0 < dropped.sum() < len(x)  # some of each at p = 0.5 over 64 samples
    torch.testing.assert_close(out[~dropped], (x + branch / (1 - p))[~dropped])
    assert branch[~dropped].abs().max() > 0


def test_blocks_without_a_residual_or_at_rate_zero_hold_no_drop_path():
    no_residual = [
        InvertedResidual(16, 64, 24, drop_path=RATE),
        InvertedResidual(16, 64, 16, stride=2, drop_path=RATE),
        UniversalInvertedBottleneck(16, 64, 16, 3, 5, stride=2, drop_path=RATE),
        FusedInvertedBottleneck(16, 64, 24, drop_path=RATE),
        MobileMQA(16, 24, heads=2, key_dim=8, drop_path=RATE),
    ]
    for block in no_residual + _blocks(0.0):
        assert not any(isinstance(m, DropPath) for m in block.modules())
    for block in _blocks(RATE):
        assert sum(isinstance(m, DropPath) for m in block.modules()) == 1
        assert block.drop_path.p == RATE


# The authors' schedule (TF Model Garden, official/vision/modeling/backbones/mobilenet.py):
# rate * (i + 1) / N for entry i of the block spec list, N its length: the stem, the
# blocks, the last 1x1 conv, and for V3 and V4 the global pool and the head conv; Mobile
# MQA ("mhsa") blocks get the flat rate. N is written out here from the authors' lists.
SPEC_LENGTHS = {
    "mobilenet_v2": 19,  # stem + 17 bottlenecks + conv 1280
    "mobilenet_v3_large": 19,  # stem + 15 bnecks + conv 960 + pool + conv 1280
    "mobilenet_v4_conv_medium": 26,  # stem + 22 rows + conv 960 + pool + conv 1280
    "mobilenet_v4_hybrid_medium": 35,  # stem + 31 rows + conv 960 + pool + conv 1280
}


@pytest.mark.parametrize("name", SPEC_LENGTHS)
def test_per_block_rates_follow_the_authors_schedule(name):
    model = create_model(name, width_mult=0.35, drop_path_rate=RATE)
    n = SPEC_LENGTHS[name]
    residual = []
    for i, layer in enumerate(model.features):
        has_residual = getattr(layer, "add", None) is not None
        drop = getattr(layer, "drop_path", None)
        if not has_residual:
            assert drop is None, (i, type(layer).__name__)
            continue
        expected = RATE if isinstance(layer, MobileMQA) else RATE * (i + 1) / n
        assert drop.p == pytest.approx(expected), (i, type(layer).__name__)
        residual.append(i)
    assert len(residual) >= 5
    # the last residual block sits before the layers the authors count without one
    last = residual[-1]
    assert model.features[last].drop_path.p == pytest.approx(RATE * (last + 1) / n)
    assert model.features[last].drop_path.p < RATE


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    """``name`` with and without drop path, the same (random) weights in both."""
    plain = recalibrate_bn(randomize_bn(create_model(name, width_mult=0.35)), resolution=64)
    dropping = create_model(name, width_mult=0.35, drop_path_rate=RATE)
    dropping.load_state_dict(plain.state_dict())  # strict: the same keys
    return plain.eval(), dropping.eval()


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v4_hybrid_medium"])
def test_eval_outputs_are_those_of_the_model_without_drop_path(name):
    plain, dropping = _pair(name)
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    assert any(isinstance(m, DropPath) for m in dropping.modules())
    assert list(plain.state_dict()) == list(dropping.state_dict())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))
        torch.manual_seed(0)
        trained = dropping.train()(x)
        torch.manual_seed(0)
        assert not torch.equal(trained, plain.train()(x))  # it does drop in training


def test_onnx_export_of_a_model_with_drop_path_matches_eval(tmp_path):
    _, model = _pair("mobilenet_v3_large")
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, 64) <= 1e-4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    actual = onnx_session(path).run(None, {"images": x.numpy()})[0]
    assert np.abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize(
    ("name", "rate", "message"),
    [
        ("mobilenet_v2", 1.5, "drop path rate must be in [0, 1), got 1.5"),
        ("mobilenet_v4_conv_small", -0.1, "drop path rate must be in [0, 1), got -0.1"),
        ("mobilenet_v3_small", 1.0, "drop path rate must be in [0, 1), got 1.0"),
        ("mobilenet_v1", 0.1, "mobilenet_v1 has no residual blocks"),
    ],
)
def test_a_rate_outside_0_1_or_for_v1_is_refused_in_one_line(name, rate, message):
    with pytest.raises(MobileNetError) as error:
        create_model(name, drop_path_rate=rate)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_v1_takes_a_rate_of_zero():
    assert create_model("mobilenet_v1", width_mult=0.25, drop_path_rate=0.0) is not None
