"""The memory-efficient executor (V2 Section 5.1) on MobileNetV4 (Qin et al., 2024): UIB
blocks in channel groups after their starting depthwise conv, fused IBs tiled and grouped,
Mobile MQA blocks whole; the same outputs as the standard forward."""

from functools import cache

import pytest
import torch

import mobilenet
from mobilenet import MobileNetError, create_model, memory_efficient
from mobilenet.cli import main
from mobilenet.memory import memory_report
from mobilenet.memory.ops import Stem
from mobilenet.memory.v4 import FullConv, GroupedUIB, WholeMQA

from .helpers import paper_models, randomize_bn, unit_scale_logits

V4 = sorted(name for name in paper_models() if name.startswith("mobilenet_v4"))
TOLERANCE = 1e-5  # on logits of unit standard deviation


@cache
def trained_like(name: str, width_mult: float = 1.0) -> torch.nn.Module:
    model = randomize_bn(create_model(name, width_mult=width_mult)).eval()
    return unit_scale_logits(model, model.classifier, resolution=96)


def images(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, resolution, resolution, generator=g)


def test_every_v4_model_is_covered():
    assert V4 == [
        "mobilenet_v4_conv_large",
        "mobilenet_v4_conv_medium",
        "mobilenet_v4_conv_small",
        "mobilenet_v4_hybrid_large",
        "mobilenet_v4_hybrid_medium",
    ]


@pytest.mark.parametrize("name", V4)
def test_same_outputs_as_the_standard_forward(name):
    model = trained_like(name, 0.5 if "large" in name else 1.0)
    x = images(1, 96)
    with torch.inference_mode():
        expected = model(x)
    assert expected.std() > 0.5
    for splits in (1, 3):
        diff = (memory_efficient(model, splits=splits)(x) - expected).abs().max().item()
        assert diff <= TOLERANCE, (splits, diff)


@pytest.mark.parametrize(("band_rows", "resolution"), [(16, 160), (5, 131), (None, 128)])
def test_tiled_leading_convs_and_fused_ib(band_rows, resolution):
    # Conv-S tiles its four leading convs with the stem; the medium and large models their
    # fused IB. Odd sizes and odd bands: the halos and the border rows.
    for name in ("mobilenet_v4_conv_small", "mobilenet_v4_hybrid_medium"):
        model = trained_like(name)
        x = images(2, resolution, seed=1)
        with torch.inference_mode():
            expected = model(x)
        net = memory_efficient(model, splits=4, band_rows=band_rows)
        diff = (net(x) - expected).abs().max().item()
        assert diff <= TOLERANCE, (name, band_rows, diff)


def test_layers_of_each_block():
    small = memory_efficient(create_model("mobilenet_v4_conv_small"), splits=2)
    tiled, *rest = small.segments
    assert [type(layer) for layer in tiled.layers] == [Stem, FullConv, FullConv, FullConv]
    assert {type(s.layers[0]) for s in rest} == {FullConv, GroupedUIB}
    hybrid = memory_efficient(create_model("mobilenet_v4_hybrid_medium"), splits=2)
    kinds = [type(s.layers[-1]) for s in hybrid.segments]
    assert kinds[0] is FullConv and hybrid.segments[0].layers[-1].fused  # stem + fused IB
    assert kinds.count(WholeMQA) == 8 and GroupedUIB in kinds


def test_conv_medium_at_512_analytic_equals_measured():
    # The command the docs record: mobilenet memory mobilenet_v4_conv_medium --resolution 512
    # (here at width 0.5, same layers, a quarter of the time).
    report = memory_report("mobilenet_v4_conv_medium", 0.5, 4, resolution=512, repeats=1)
    analytic, measured = report.analytic, report.measured
    assert measured["efficient_bytes"] == analytic["efficient_bytes"]
    assert analytic["efficient_bytes"] < 0.6 * analytic["standard_bytes"]
    assert report.max_abs_diff <= 1e-5 * max(report.max_abs_output, 1e-3)


def test_hybrid_estimate_bounds_the_measured_peak():
    report = memory_report("mobilenet_v4_hybrid_medium", 0.75, 2, resolution=160, repeats=1)
    assert report.measured["efficient_bytes"] <= report.analytic["efficient_bytes"]
    assert report.measured["efficient_bytes"] < report.measured["standard_bytes"]


def test_splits_larger_than_the_smallest_expansion_refused(capsys):
    model = create_model("mobilenet_v4_conv_small", width_mult=0.35)
    smallest = min(m.expand.conv.out_channels for m in model.features if hasattr(m, "expand"))
    with pytest.raises(MobileNetError, match=f"more than the {smallest} channels"):
        memory_efficient(model, smallest + 1)
    args = ["memory", "mobilenet_v4_conv_small", "--splits", "1000", "--resolution", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mobilenet memory: error:")


def test_cli_runs_on_v4(capsys):
    args = ["memory", "mobilenet_v4_conv_small", "--resolution", "96", "--repeats", "1"]
    assert main([*args, "--splits", "2"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v4_conv_small" in out and "measured peak" in out


def test_a_block_without_an_executor_form_is_refused_by_name():
    model = create_model("mobilenet_v4_conv_small", width_mult=0.5)
    model.features[3] = torch.nn.Identity()  # a layer the table has no row for
    message = (
        r"^the memory-efficient executor has no form of Identity \(in mobilenet_v4_conv_small\)$"
    )
    with pytest.raises(MobileNetError, match=message):
        memory_efficient(model, splits=2)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mobilenet_v4_conv_aa_medium", "anti-aliased downsampling of features.1.expand"),
        ("mobilenet_v5_base", "cannot split features.0.bn (an RMS norm"),
    ],
)
def test_what_no_form_computes_is_refused_by_name(name, message):
    """timm's anti-aliased V4 (its strided convs run at stride 1, then pool) and
    MobileNetV5 (RMS norm over all channels) are refused in one line, not computed wrong."""
    model = mobilenet.create_model(name, width_mult=0.25 if "v5" in name else 1.0)
    with pytest.raises(MobileNetError) as error:
        memory_efficient(model)
    assert message in str(error.value) and "\n" not in str(error.value)
