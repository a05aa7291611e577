"""Memory-efficient inference (V2 Section 5.1): same outputs, a fraction of the memory.

Outputs are compared on models with random BatchNorm statistics whose logits are scaled to
unit standard deviation, so the absolute tolerance of 1e-5 is relative to the logit scale.
"""

import json
from functools import cache

import pytest
import torch

from mobilenet import MobileNetError, cost, create_model, memory_efficient
from mobilenet.cli import main
from mobilenet.export import prepare_for_inference
from mobilenet.memory import PeakMemory, measure_peak, memory_report

from .helpers import paper_models, randomize_bn, unit_scale_logits

SUPPORTED = [
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "mobilenet_v3_large_minimal",
    "mobilenet_v3_small_minimal",
]
TOLERANCE = 1e-5


@cache
def trained_like(name: str, width_mult: float = 1.0) -> torch.nn.Module:
    model = randomize_bn(create_model(name, width_mult=width_mult)).eval()
    return unit_scale_logits(model, model.classifier, resolution=128)


def images(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, resolution, resolution, generator=g)


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x)


def test_every_supported_model_is_registered():
    v1 = {"mobilenet_v1", "mobilenet_v1_conv"}
    # V4's models (UIB, fused IB, Mobile MQA) are tested in tests/test_memory_v4.py.
    v4 = {name for name in paper_models() if name.startswith("mobilenet_v4")}
    assert len(v4) == 5
    assert set(SUPPORTED) == set(paper_models()) - v1 - v4  # V2 Section 5.1: IR


@pytest.mark.parametrize("name", SUPPORTED)
def test_same_outputs_every_split_at_224(name):
    model = trained_like(name)
    x = images(1, 224)
    expected = reference(model, x)
    assert expected.std() > 0.5  # logits of unit scale: the tolerance means something
    for splits in (1, 2, 4, 8):
        out = memory_efficient(model, splits=splits)(x)
        assert out.shape == expected.shape
        diff = (out - expected).abs().max().item()
        assert diff <= TOLERANCE, (splits, diff)


@pytest.mark.parametrize(
    ("name", "splits", "resolution", "batch"),
    [
        ("mobilenet_v2", 4, 512, 1),
        ("mobilenet_v3_large", 2, 512, 1),
        ("mobilenet_v3_small", 8, 512, 4),
        ("mobilenet_v3_small_minimal", 1, 512, 4),
        ("mobilenet_v2", 8, 224, 4),
        ("mobilenet_v3_large_minimal", 2, 224, 4),
    ],
)
def test_same_outputs_at_512_and_in_batches(name, splits, resolution, batch):
    model = trained_like(name)
    x = images(batch, resolution, seed=batch)
    diff = (memory_efficient(model, splits=splits)(x) - reference(model, x)).abs().max().item()
    assert diff <= TOLERANCE


@pytest.mark.parametrize("band_rows", [None, 1, 3, 5])
def test_bands_of_any_height_at_odd_sizes(band_rows):
    """Halo rows, bands touching the top and bottom borders, odd sizes, stride 2."""
    model = trained_like("mobilenet_v2", 0.35)
    x = images(1, 99)[..., :97]  # not square, odd sizes
    net = memory_efficient(model, splits=3, band_rows=band_rows)
    assert (net(x) - reference(model, x)).abs().max().item() <= TOLERANCE


def test_model_left_as_it_is():
    model = create_model("mobilenet_v3_small", width_mult=0.5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory_efficient(model, splits=2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("resolution", [224, 1024])
def test_v2_peak_memory_a_quarter_of_the_standard_forward(resolution):
    model = create_model("mobilenet_v2").eval()
    standard = prepare_for_inference(model, channels_last=False)
    net = memory_efficient(model, splits=4)
    x = images(1, resolution)
    standard_peak = measure_peak(lambda t: reference(standard, t), x, module=standard)
    efficient_peak = measure_peak(net, x, module=net)
    assert efficient_peak <= 0.25 * standard_peak, efficient_peak / standard_peak
    # ... and the measurement agrees with the schedule replayed from the shapes.
    assert efficient_peak == pytest.approx(net.analytic_peak(resolution), rel=0.01)


@pytest.mark.parametrize(
    ("name", "splits", "batch"),
    [("mobilenet_v2", 2, 3), ("mobilenet_v3_large", 4, 1), ("mobilenet_v3_small_minimal", 8, 2)],
)
def test_analytic_agrees_with_cost_and_measurement(name, splits, batch):
    report = memory_report(name, 0.5, splits, resolution=160, batch=batch, repeats=1)
    folded = prepare_for_inference(create_model(name, width_mult=0.5), channels_last=False)
    analytic, measured = report.analytic, report.measured
    folded_cost = cost(folded, 160)
    assert analytic["standard_bytes"] == folded_cost.peak_activation_bytes * batch
    # Eager nn.Sequential holds a block's input until the block returns; the traced graph
    # frees it after its last reader. That one tensor is the whole difference.
    extra = measured["standard_bytes"] - analytic["standard_bytes"]
    assert 0 <= extra <= folded_cost.largest_activation_bytes * batch
    assert measured["efficient_bytes"] == pytest.approx(analytic["efficient_bytes"], rel=0.01)
    assert analytic["efficient_bytes"] < analytic["standard_bytes"]
    assert report.time_ms["standard"] > 0 and report.time_ms["efficient"] > 0
    assert report.max_abs_diff <= TOLERANCE


def test_paper_bound_of_v2():
    """The largest |input| + |output| at 224: the first block, 112x112x32 -> 112x112x16."""
    net = memory_efficient(create_model("mobilenet_v2"), splits=2)
    assert net.paper_bound(224) == 4 * 112 * 112 * (32 + 16)
    assert net.paper_bound(224, batch=2) == 2 * net.paper_bound(224)


def test_peak_memory_sees_allocations_and_frees():
    x = torch.ones(1000)
    with PeakMemory(exclude=[x]) as tracker:
        a = x * 2  # 4000 bytes
        b = a.view(10, 100)  # a view: nothing new
        del a
        assert tracker.live == 4000
        del b  # the storage goes with its last view
        assert tracker.live == 0
        c = x + 1
        d = c + 1
        del c
        e = d.add_(1)  # in place: nothing new
        assert tracker.live == 4000
        del d, e
    assert tracker.peak == 8000


@pytest.mark.parametrize(
    ("name", "splits", "message"),
    [
        ("mobilenet_v3_small", 0, "splits must be a positive integer"),
        ("mobilenet_v3_small", -2, "splits must be a positive integer"),
        ("mobilenet_v3_small", 17, "more than the 16 channels"),
        ("mobilenet_v2", 33, "more than the 32 channels"),
        ("mobilenet_v1", 2, "no inverted residual blocks"),
        ("mobilenet_v1_conv", 2, "no inverted residual blocks"),
    ],
)
def test_bad_splits_and_models(name, splits, message, capsys):
    with pytest.raises(MobileNetError, match=message):
        memory_efficient(create_model(name, width_mult=0.5 if "v1" in name else 1.0), splits)
    assert main(["memory", name, "--splits", str(splits), "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("mobilenet memory: error:")


def test_cli_json(capsys):
    args = ["memory", "mobilenet_v3_small", "--width-mult", "0.75", "--splits", "2"]
    assert main([*args, "--resolution", "96", "--batch", "2", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"], out["resolution"], out["batch"], out["splits"]) == (
        "mobilenet_v3_small",
        96,
        2,
        2,
    )
    assert set(out["analytic"]) == {"standard_bytes", "efficient_bytes", "paper_bound_bytes"}
    assert set(out["measured"]) == {"standard_bytes", "efficient_bytes"}
    assert set(out["time_ms"]) == {"standard", "efficient"}
    assert 0 < out["measured"]["efficient_bytes"] < out["measured"]["standard_bytes"]


def test_cli_table(capsys):
    args = ["memory", "mobilenet_v2", "--width-mult", "0.35", "--resolution", "64"]
    assert main([*args, "--no-tiling", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "no tiling" in out and "measured peak" in out and "paper's bound" in out
