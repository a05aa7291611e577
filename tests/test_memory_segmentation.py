"""Memory-efficient inference of the segmentation models: dilated depthwise convs in bands,
the heads at low resolution, the banded upsampling; the same outputs as the standard
forward, a fraction of its memory (the output aside).

Outputs are compared on models with random BatchNorm statistics whose logits are scaled to
unit standard deviation, so the tolerance of 1e-5 is relative to the logit scale.
"""

import json
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mobilenet import MobileNetError, create_model, memory_efficient
from mobilenet.blocks import InvertedResidual
from mobilenet.cli import main
from mobilenet.export import prepare_for_inference
from mobilenet.layers import ConvBNAct
from mobilenet.memory import MemoryEfficientSegmenter, measure_peak, memory_report
from mobilenet.memory.backbone import backbone_segments
from mobilenet.memory.heads import upsample_rows
from mobilenet.memory.ops import ConvWindow

from .helpers import randomize_bn

SEGMENTATION = [
    "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_small",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_mobilenet_v2",
]
TOLERANCE = 1e-5
SIZE = (72, 104)  # small, not square, not a multiple of the output stride


def _classifiers(model: nn.Module) -> list[nn.Conv2d]:
    """The convs whose sum is each output's logits (both of LR-ASPP's, summed)."""
    head = model.head
    if hasattr(head, "low_classifier"):
        return [head.low_classifier, head.high_classifier]
    return [head.classifier]


def _scale_to_unit(model: nn.Module, key: str, convs: list[nn.Conv2d]) -> None:
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        std = model(x)[key].std()
        for conv in convs:
            conv.weight /= std
            conv.bias /= std


@cache
def trained_like(name: str, output_stride: int = 16) -> nn.Module:
    """Random BatchNorm statistics and logits of unit standard deviation (aux included)."""
    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    model = create_model(name, width_mult=0.5, output_stride=output_stride, **kwargs)
    model = randomize_bn(model).eval()
    _scale_to_unit(model, "out", _classifiers(model))
    if model.aux_head is not None:
        _scale_to_unit(model, "aux", [model.aux_head.classifier])
    return model


def reference(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return model(x)


def _max_diff(expected: dict, actual: dict) -> float:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape
        assert actual[key].is_contiguous()
        assert 0.5 < expected[key].std() < 2  # unit scale: the tolerance means something
    return max((expected[k] - actual[k]).abs().max().item() for k in expected)


@pytest.mark.parametrize("name", SEGMENTATION)
@pytest.mark.parametrize("band_rows", [None, 5])
def test_same_outputs_as_the_standard_forward(name, band_rows):
    model = trained_like(name)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(0))
    net = memory_efficient(model, splits=3, band_rows=band_rows)
    assert isinstance(net, MemoryEfficientSegmenter)
    assert _max_diff(reference(model, x), net(x)) <= TOLERANCE


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v2"])
def test_same_outputs_at_output_stride_8(name):
    """Rates 2 and 4 (V3) and 2, 4 (V2): more dilated depthwise convs, at larger maps."""
    model = trained_like(name, output_stride=8)
    x = torch.randn(1, 3, 67, 45, generator=torch.Generator().manual_seed(2))  # odd sizes
    assert _max_diff(reference(model, x), memory_efficient(model, 2, 4)(x)) <= TOLERANCE


def test_dilated_window_reads_a_halo_of_dilation_rows():
    win = ConvWindow(kernel=3, stride=1, padding=4, dilation=4)  # as ConvBNAct pads it
    assert win.out_size(50) == 50
    assert win.rows_needed(10, 20, 50) == (6, 24, 0, 0)  # 4 rows above and below
    assert win.rows_needed(0, 5, 50) == (0, 9, 4, 0)  # zeros from the padding on top
    assert win.rows_needed(48, 50, 50) == (44, 50, 0, 4)  # row 49 reads up to row 53
    k5 = ConvWindow(kernel=5, stride=2, padding=4, dilation=2)
    conv = nn.Conv2d(1, 1, 5, stride=2, padding=4, dilation=2)
    assert k5.out_size(37) == conv(torch.zeros(1, 1, 37, 1)).shape[2]


def test_dilated_blocks_in_bands_equal_the_whole_map():
    """Dilated blocks inside the tiled segment: each band reads its halo of d * (k // 2)."""
    torch.manual_seed(0)
    layers = [
        ConvBNAct(3, 8, 3, stride=2),
        InvertedResidual(8, 24, 8, 3, dilation=2),
        InvertedResidual(8, 32, 16, 5, dilation=4, act=nn.Hardswish),
        InvertedResidual(16, 48, 16, 3, dilation=3),
    ]
    model = randomize_bn(nn.Sequential(*layers)).eval()
    folded = prepare_for_inference(model, channels_last=False)
    x = torch.randn(3, 61, 47)
    with torch.inference_mode():
        expected = folded(x[None])[0].permute(1, 2, 0)
        for band_rows in (1, 3, 7, None):
            (segment,) = backbone_segments(folded[0], list(folded[1:]), "test", 2, band_rows)
            assert len(segment.layers) == 4  # all tiled: stride 2 never reaches 8
            out = segment(x, 61, 47)
            assert (out - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize(("n_in", "n_out"), [(9, 72), (13, 104), (5, 67), (40, 17), (1, 8)])
@pytest.mark.parametrize("band_rows", [1, 4, 16])
def test_banded_upsampling_equals_interpolate(n_in, n_out, band_rows):
    g = torch.Generator().manual_seed(n_in)
    chw = torch.randn(6, n_in, n_in + 3, generator=g)
    size = (n_out, n_out + 11)
    expected = F.interpolate(chw[None], size, mode="bilinear", align_corners=False)[0]
    bands, hwc_bands = [], []
    for r0 in range(0, n_out, band_rows):
        r1 = min(r0 + band_rows, n_out)
        bands.append(upsample_rows(chw, size, r0, r1, channels_last=False))
        hwc_bands.append(upsample_rows(chw.permute(1, 2, 0).contiguous(), size, r0, r1))
    scale = expected.abs().max().item()  # float rounding only: the same coordinates
    assert (torch.cat(bands, 1) - expected).abs().max().item() <= 1e-6 * scale
    assert (torch.cat(hwc_bands, 0).permute(2, 0, 1) - expected).abs().max().item() <= 1e-6 * scale


def test_peak_memory_with_and_without_the_output():
    """The executor's measurement agrees with its schedule; without the full-size logits
    (the output every forward returns) its peak is a small fraction of the standard's."""
    model = create_model("lraspp_mobilenet_v3_large", width_mult=0.5).eval()
    standard = prepare_for_inference(model, channels_last=False)
    net = memory_efficient(model, splits=4)
    x = torch.randn(1, 3, 256, 512)
    peak, working, output = net.analytic_peaks((256, 512))
    assert output == 4 * 21 * 256 * 512
    measured = measure_peak(net, x, module=net)
    measured_working = measure_peak(net, x, module=net, without_result=True)
    assert measured == pytest.approx(peak, rel=0.01)
    assert measured_working == pytest.approx(working, rel=0.01)
    assert measured - output <= measured_working  # the output is counted in one only

    def run(t):
        with torch.inference_mode():
            return standard(t)

    assert measured_working <= 0.2 * measure_peak(run, x, module=standard, without_result=True)
    assert measured < measure_peak(run, x, module=standard)


def test_measure_peak_leaves_out_the_result():
    x = torch.ones(1000)

    def fn(t):
        a = t * 2  # 4000 bytes, freed before the result exists
        b = a + 1
        del a
        c = torch.cat([b, b])  # the result: 8000 bytes
        return {"out": c}

    assert measure_peak(fn, x) == 12000  # b and c
    assert measure_peak(fn, x, without_result=True) == 8000  # a and b


def test_report_and_cli_of_a_segmentation_model(capsys):
    report = memory_report("lraspp_mobilenet_v3_small", 0.5, 2, (64, 96), batch=2, repeats=1)
    assert report.output_bytes == 2 * 4 * 21 * 64 * 96
    assert report.max_abs_diff <= 1e-5 * report.max_abs_output
    wo, m = report.measured_without_output, report.measured
    assert (
        wo["efficient_bytes"] < wo["standard_bytes"]
        and m["efficient_bytes"] >= wo["efficient_bytes"]
    )
    args = ["memory", "deeplabv3_mobilenet_v2", "--width-mult", "0.35", "--resolution", "64x96"]
    assert main([*args, "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resolution"] == [64, 96] and out["output_bytes"] == 4 * 21 * 64 * 96
    assert set(out["measured_without_output"]) == {"standard_bytes", "efficient_bytes"}
    assert main([*args, "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "at 64x96" in table and "measured, without output" in table


def test_refusals_in_one_line(capsys):
    with pytest.raises(MobileNetError, match="more than the 16 channels"):
        memory_efficient(create_model("lraspp_mobilenet_v3_small", width_mult=0.5), 17)
    for args, message in [
        (["ssdlite_mobilenet_v3_small"], "unknown model 'ssdlite_mobilenet_v3_small'"),
        (["lraspp_mobilenet_v3_small", "--resolution", "64x0"], "each side must be an integer"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(["memory", *args])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err


def test_the_heads_register_their_forms_and_others_are_refused():
    from mobilenet.memory.forms import EXECUTOR_FORMS
    from mobilenet.segmentation import DeepLabHead, FCNHead, LRASPPHead

    model = create_model("lraspp_mobilenet_v3_small", width_mult=0.5)
    memory_efficient(model, splits=2)
    assert {LRASPPHead, DeepLabHead, FCNHead} <= set(EXECUTOR_FORMS)
    model.head = nn.Identity()  # a head the table has no row for
    with pytest.raises(
        MobileNetError, match=r"no form of Identity \(in lraspp_mobilenet_v3_small\)$"
    ):
        memory_efficient(model, splits=2)
