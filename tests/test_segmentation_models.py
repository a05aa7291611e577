"""Atrous backbones and the segmentation models (V2 Section 6.3, V3 Section 6.4):
torchvision and timm give the same outputs, golden costs, any input size."""

import pytest
import timm
import torch
import torchvision
from torchvision.models import segmentation as tv_segmentation

from mobilenet import MobileNetError, cost, create_model, list_models, load_weights, save_weights
from mobilenet.models import checkpoint_task, model_task
from mobilenet.models import mobilenet_v3 as v3
from mobilenet.models.atrous import atrous_layout

from .helpers import randomize_bn, recalibrate_bn

SEGMENTATION = [
    "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_small",
    "deeplabv3_mobilenet_v3_large",
    "deeplabv3_mobilenet_v2",
]
ATROUS = ["mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"]
ATROUS += ["mobilenet_v3_large_minimal", "mobilenet_v3_small_minimal"]


def _image(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def _max_diff(expected: torch.Tensor, actual: torch.Tensor) -> float:
    assert expected.shape == actual.shape
    assert expected.abs().max() > 1e-2  # a comparison of real signals, not of zeros
    return (expected - actual).abs().max().item()


# ----------------------------------------------------------------------------- backbones


def test_atrous_layout_conventions():
    strides = [2, 2, 2, 2, 1, 2, 1]
    assert atrous_layout(strides) == [(s, 1) for s in strides]
    assert atrous_layout(strides, 16) == [(2, 1)] * 4 + [(1, 1), (1, 1), (1, 2)]
    assert atrous_layout(strides, 16, whole_stage=True) == [(2, 1)] * 4 + [(1, 1)] + [(1, 2)] * 2
    assert atrous_layout(strides, 8)[3:] == [(1, 1), (1, 2), (1, 2), (1, 4)]


@pytest.mark.parametrize("name", ATROUS)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_feature_levels_report_the_output_stride(name, output_stride):
    model = create_model(name, output_stride=output_stride, width_mult=0.5).eval()
    assert model.config.output_stride == output_stride
    strides = [info.stride for info in model.feature_info]
    assert strides == [s for s in (2, 4, 8, 16, 32) if s <= output_stride]
    x = _image(67, 101)  # odd, non-square: every stride-2 conv rounds up
    with torch.no_grad():
        maps = model.feature_maps(x)
        logits = model(x)
    for info in model.feature_info:
        size = (-(-67 // info.stride), -(-101 // info.stride))
        assert maps[info.stride].shape[1:] == (info.channels, *size)
    assert logits.shape == (1, 1000)


@pytest.mark.parametrize("bad", [4, 64, 0, "16", 16.0, True, None])
def test_invalid_output_stride_is_refused_in_one_line(bad):
    for name in ("mobilenet_v3_small", "lraspp_mobilenet_v3_small"):
        with pytest.raises(MobileNetError, match="output_stride must be 8, 16 or 32") as e:
            create_model(name, output_stride=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(MobileNetError, match="output_stride"):
        create_model("mobilenet_v1", output_stride=16)  # V1 has no atrous variant


@pytest.mark.parametrize("output_stride", [16, 8])
def test_timm_v2_output_stride_gives_identical_outputs(output_stride):
    torch.manual_seed(0)
    ref = timm.create_model("mobilenetv2_100", output_stride=output_stride)
    ref = recalibrate_bn(randomize_bn(ref), resolution=64)
    model = create_model("mobilenet_v2", output_stride=output_stride)
    assert load_weights(model, ref.state_dict()) == "timm"
    x = _image(97, 131)
    with torch.no_grad():
        assert _max_diff(ref.forward_features(x), model.eval().forward_features(x)) <= 1e-5
        assert _max_diff(ref(x), model(x)) <= 1e-5


@pytest.mark.parametrize(
    ("ref_name", "ours"),
    [
        ("mobilenetv3_large_100", "mobilenet_v3_large"),
        ("mobilenetv3_small_100", "mobilenet_v3_small"),
    ],
)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_timm_v3_output_stride_gives_identical_feature_maps(ref_name, ours, output_stride):
    """timm's V3 classifier has no output_stride; its feature extractor has."""
    torch.manual_seed(0)
    full = recalibrate_bn(randomize_bn(timm.create_model(ref_name)), resolution=64)
    ref = timm.create_model(ref_name, features_only=True, output_stride=output_stride)
    ref.load_state_dict(full.state_dict(), strict=False)  # the classifier head left out
    model = create_model(ours, output_stride=output_stride)
    load_weights(model, full.state_dict(), origin=f"timm:{ref_name}")
    x = _image(97, 131)
    with torch.no_grad():
        expected, actual = ref.eval()(x), model.eval().feature_maps(x)
    # Relative to the maps' magnitude (up to ~100 here): kernels of another CPU sum in
    # another order, a relative ~1e-6 after fifty layers; a wrong layer differs by O(1).
    last = expected[-1]
    assert _max_diff(last, actual[output_stride]) <= 1e-5 * max(1.0, float(last.abs().max()))
    if output_stride == 16:  # the end of the stride-8 stage
        scale = max(1.0, float(expected[2].abs().max()))
        assert _max_diff(expected[2], actual[8]) <= 1e-5 * scale


def test_torchvision_dilated_v3_gives_identical_features():
    """torchvision dilates the block that gives up its stride too: its convention."""
    torch.manual_seed(0)
    ref = recalibrate_bn(randomize_bn(torchvision.models.mobilenet_v3_large(dilated=True)), 64)
    x = _image(97, 131)
    with torch.no_grad():
        expected = ref.features(x)
        for whole_stage, close in ((True, True), (False, False)):
            model = v3.build_v3("v3", v3.V3_LARGE, 1.0, 1000, 0.2, False, 16, whole_stage)
            load_weights(model, ref.state_dict())
            diff = _max_diff(expected, model.eval().forward_features(x))
            assert (diff <= 1e-5) == close, diff


def test_dilated_stages_cost_four_times_per_halving():
    c32, c16 = (
        cost(create_model("mobilenet_v2")),
        cost(create_model("mobilenet_v2", output_stride=16)),
    )
    assert c16.params == c32.params  # atrous convolution adds no weights
    # the 160-channel stage from its first depthwise conv, the 320 block and the last conv
    later = ("features.14.dw", "features.14.project", "features.15.", "features.16.")
    later += ("features.17.", "features.18.")
    for a, b in zip(c32.layers, c16.layers, strict=True):
        assert b.madds == (4 if a.name.startswith(later) else 1) * a.madds, a.name
    assert c16.madds == 537_159_680  # 300.8M at output stride 32


# ----------------------------------------------------------------------------- models


def test_segmentation_models_register_on_first_use():
    assert list_models(task="segmentation") == SEGMENTATION
    assert all(model_task(name) == "segmentation" for name in SEGMENTATION)
    assert not set(SEGMENTATION) & set(list_models())


@pytest.mark.parametrize("name", SEGMENTATION)
def test_any_input_size_and_number_of_classes(name):
    model = create_model(name, num_classes=5, width_mult=0.5).eval()
    assert [info.stride for info in model.feature_info] == [2, 4, 8, 16]
    for size in ((65, 97), (97, 64), (33, 33)):
        with torch.no_grad():
            out = model(_image(*size))
        assert list(out) == ["out"] and out["out"].shape == (1, 5, *size)


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_small", "deeplabv3_mobilenet_v2"])
def test_training_reaches_every_parameter(name):
    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    model = create_model(name, num_classes=3, width_mult=0.35, **kwargs).train()
    out = model(torch.randn(2, 3, 48, 80))
    assert set(out) == ({"out", "aux"} if kwargs else {"out"})
    sum(v.logsumexp(1).mean() for v in out.values()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_torch_export():
    model = create_model("lraspp_mobilenet_v3_small", width_mult=0.5, num_classes=4).eval()
    x = _image(64, 96)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("output_stride", [8, 32])
def test_other_output_strides(output_stride):
    model = create_model("lraspp_mobilenet_v3_small", output_stride=output_stride).eval()
    assert model.feature_info[-1].stride == output_stride
    with torch.no_grad():
        assert model(_image(70, 90))["out"].shape == (1, 21, 70, 90)


# ----------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("lraspp_mobilenet_v3_large", {}), ("deeplabv3_mobilenet_v3_large", {"aux_loss": True})],
)
def test_torchvision_state_dict_gives_identical_outputs(name, kwargs, tmp_path):
    torch.manual_seed(0)
    ref = getattr(tv_segmentation, name)(weights=None, weights_backbone=None, **kwargs)
    ref = randomize_bn(ref).eval()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    model = create_model(name, weights=path, **kwargs).eval()  # 21 classes from the file
    assert model.num_classes == 21 and model.config.bn_eps == 1e-3
    for size in ((520, 520), (375, 500)):
        x = _image(*size)
        with torch.no_grad():
            expected, actual = ref(x), model(x)
        assert list(expected) == list(actual)
        for key in expected:
            assert _max_diff(expected[key], actual[key]) <= 1e-5, (key, size)


def test_torchvision_auxiliary_head_is_dropped_when_unused():
    ref = tv_segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True
    )
    model = create_model("deeplabv3_mobilenet_v3_large")
    assert load_weights(model, ref.state_dict()) == "torchvision"
    assert model.aux_head is None
    assert checkpoint_task(ref.state_dict(), {}) == "segmentation"


def test_own_file_round_trip_keeps_the_config(tmp_path):
    model = randomize_bn(create_model("deeplabv3_mobilenet_v2", num_classes=4, aux_loss=True))
    path = save_weights(model, tmp_path / "seg.safetensors")
    loaded = create_model("deeplabv3_mobilenet_v2", weights=path).eval()
    assert loaded.config == model.config
    x = _image(40, 56)
    with torch.no_grad():
        expected, actual = model.eval()(x), loaded(x)
    assert all(torch.equal(expected[k], actual[k]) for k in ("out", "aux"))
    plain = create_model("deeplabv3_mobilenet_v2", weights=path, aux_loss=False)
    assert plain.aux_head is None
    v2 = create_model("mobilenet_v2", output_stride=8)
    path = save_weights(v2, tmp_path / "v2.safetensors")
    assert create_model("mobilenet_v2", weights=path).config.output_stride == 8


# ----------------------------------------------------------------------------- cost


def _cost(name, resolution, **kwargs):
    with torch.device("meta"):
        return cost(create_model(name, **kwargs), resolution)


@pytest.mark.parametrize(
    ("name", "kwargs", "resolution", "params", "madds"),
    [
        # torchvision's figures: 3,221,538 / 2.086 G and 11,029,328 / 10.452 G at 520
        ("lraspp_mobilenet_v3_large", {}, 520, 3_221_538, 2_086_219_688),
        ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, 520, 11_029_328, 10_452_447_938),
        # V2 Table 7, OS 16 without ASPP: 2.11M params, 2.75B MAdds (DeepLab's 513 crop)
        ("deeplabv3_mobilenet_v2", {}, 512, 2_113_557, 2_603_958_272),
        ("deeplabv3_mobilenet_v2", {}, 513, 2_113_557, 2_740_709_056),
        # V3 Table 7, Cityscapes 1024x2048, RF2: 1.51M / 9.74B and 0.47M / 2.90B (see
        # mobilenet.segmentation.model for the difference)
        (
            "lraspp_mobilenet_v3_large",
            {"reduced_tail": True},
            (1024, 2048),
            1_746_878,
            9_915_229_056,
        ),
        ("lraspp_mobilenet_v3_small", {"reduced_tail": True}, (1024, 2048), 515_614, 2_831_991_808),
    ],
)
def test_golden_costs(name, kwargs, resolution, params, madds):
    classes = 19 if isinstance(resolution, tuple) else 21
    c = _cost(name, resolution, num_classes=classes, **kwargs)
    assert (c.params, c.madds, c.resolution) == (params, madds, resolution)


def test_cost_of_a_non_square_input():
    square, wide = _cost("mobilenet_v2", 224), _cost("mobilenet_v2", (224, 448))
    classifier = 1280 * 1000  # the same at any input size; the convs' MAdds double
    assert wide.madds - classifier == 2 * (square.madds - classifier)
    assert wide.layers[0].output_shape == (1, 32, 112, 224)
    for bad in [(224,), (224, 16), (224, 224.0), "224"]:
        with pytest.raises(MobileNetError, match="resolution"):
            _cost("mobilenet_v2", bad)
