"""timm's other MobileNets, built from our tables: the depth-scaled MobileNetV2 (110d, 120d)
and MobileNetV3-Large (150d), and the anti-aliased MobileNetV4s (Conv-M and Conv-L with
average-pooling or blur downsampling). Each loads timm's state dict by name and gives
timm's outputs, at a small size here and at its own resolution in the slow tests."""

from functools import cache

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import BlurPool2d as TimmBlurPool2d
from torch import nn

from mobilenet import cost, create_model, load_weights
from mobilenet.card import ModelCard
from mobilenet.cli import main
from mobilenet.export import export_onnx
from mobilenet.export.int8 import quantize_model
from mobilenet.export.int8_file import int8_from_checkpoint, save_int8
from mobilenet.export.prepare import measure_batchnorm
from mobilenet.layers import BlurPool2d
from mobilenet.models.mobilenet_v2 import V2_TABLE_2, deepen, scale_depth
from mobilenet.models.mobilenet_v3 import V3_LARGE, V3_SMALL
from mobilenet.models.mobilenet_v3 import deepen as deepen_v3

from .helpers import needs_x86_int8, random_model, randomize_bn

# ours, timm's, the resolution of timm's default checkpoint (its pretrained_cfg)
FAMILY = [
    ("mobilenet_v2_110d", "mobilenetv2_110d", 224),
    ("mobilenet_v2_120d", "mobilenetv2_120d", 224),
    ("mobilenet_v3_large_150d", "mobilenetv3_large_150d", 256),
    ("mobilenet_v4_conv_aa_medium", "mobilenetv4_conv_aa_medium", 256),
    ("mobilenet_v4_conv_blur_medium", "mobilenetv4_conv_blur_medium", 224),
    ("mobilenet_v4_conv_aa_large", "mobilenetv4_conv_aa_large", 448),
]
SMALL = 96  # the fast tests' size; the anti-aliased models are also run at an odd one
ODD = 75
TOLERANCE = 1e-4  # on logits of unit standard deviation


def _images(batch: int, resolution: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, resolution, resolution, generator=g)


@cache
def _reference(name: str, resolution: int) -> nn.Module:
    """timm's model with seeded random weights, random BatchNorm affines, running
    statistics measured on two random images at ``resolution`` (untrained statistics
    shrink activations to nothing; those of another size let deep stages grow), and
    logits brought to unit scale there."""
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model(name, pretrained=False))
    ref = measure_batchnorm(ref, [_images(2, resolution, seed=0)])
    with torch.no_grad():
        std = ref(_images(2, resolution, seed=2)).std()
        classifier = ref.get_classifier()
        classifier.weight /= std
        classifier.bias /= std
    return ref


def _saved(ref: nn.Module, tmp_path) -> str:
    path = tmp_path / "model.safetensors"  # as the Hugging Face hub ships timm weights
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return str(path)


def _max_diff(ref: nn.Module, ours: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected, actual = ref(x), ours(x)
    assert expected.abs().max() > 1e-2  # real signals, not zeros
    return (expected - actual).abs().max().item()


@pytest.mark.parametrize(("ours", "name", "native"), FAMILY)
def test_timm_state_dict_loads_by_name_with_timm_outputs(ours, name, native, tmp_path):
    ref = _reference(name, SMALL)
    model = create_model(ours, weights=_saved(ref, tmp_path)).eval()
    assert model.config.name == ours and model.config.bn_eps == 1e-5
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(p.numel() for p in ref.parameters())
    assert _max_diff(ref, model, _images(2, SMALL)) <= TOLERANCE
    if "_aa_" in ours or "_blur_" in ours:  # pooling floors an odd side, a conv rounds up
        assert _max_diff(ref, model, _images(1, ODD)) <= TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize(("ours", "name", "native"), FAMILY)
def test_timm_outputs_at_the_models_own_resolution(ours, name, native, tmp_path):
    assert timm.create_model(name).pretrained_cfg["input_size"] == (3, native, native)
    ref = _reference(name, native)
    model = create_model(ours)
    assert model.eval_config.resolution == native
    assert load_weights(model, _saved(ref, tmp_path)) == "timm"
    assert _max_diff(ref, model.eval(), _images(1, native)) <= TOLERANCE


@pytest.mark.parametrize(("ours", "name", "native"), FAMILY)
def test_cost_counts_timms_parameters(ours, name, native):
    c = cost(ours, native)  # on the meta device: nothing is computed
    assert c.params == sum(p.numel() for p in timm.create_model(name).parameters())
    assert c.madds > 0


def test_the_downsampler_matters_and_adds_no_weights():
    torch.manual_seed(0)
    plain = randomize_bn(create_model("mobilenet_v4_conv_medium")).eval()
    for name in ("mobilenet_v4_conv_aa_medium", "mobilenet_v4_conv_blur_medium"):
        model = create_model(name).eval()
        model.load_state_dict(plain.state_dict())  # the same keys, the same shapes
        x = _images(1, 64)
        with torch.no_grad():
            assert (model(x) - plain(x)).abs().max() > 1e-3
    # where it sits: after the strided conv's activation; the stem keeps its stride
    model = create_model("mobilenet_v4_conv_blur_medium")
    assert model.features[0].aa is None and model.features[0].conv.stride == (2, 2)
    fused, uib = model.features[1], model.features[2]
    assert fused.expand.conv.stride == (1, 1) and isinstance(fused.expand.aa, BlurPool2d)
    assert uib.dw_mid.conv.stride == (1, 1) and uib.dw_mid.aa.pad_mode == "constant"
    assert [info.stride for info in model.feature_info] == [2, 4, 8, 16, 32]


def test_anti_aliased_model_exports_to_onnx(tmp_path):
    # the zoo-wide export tests run over the papers' models; the pools, once here
    model = random_model("mobilenet_v4_conv_blur_medium", 64)
    assert export_onnx(model, tmp_path / "model.onnx", 64) <= 1e-4


@needs_x86_int8
def test_blurred_model_quantizes_and_reloads(tmp_path):
    # as tests/test_int8.py quantizes the papers' models: the blur's pad and pools in int8
    torch.manual_seed(0)
    name = "mobilenet_v4_conv_blur_medium"
    model = randomize_bn(create_model(name, width_mult=0.5, num_classes=7)).eval()
    int8 = quantize_model(model, [torch.randn(8, 3, 64, 64) for _ in range(2)], resolution=64)
    x = torch.randn(3, 3, 64, 64)
    expected, reference = int8(x), model(x)
    assert (expected - reference).abs().max() < 0.25 * reference.abs().max()
    card = ModelCard(classes=tuple(map(str, range(7))), input_size=(64, 64))
    path = save_int8(int8, tmp_path / "m.safetensors", card)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    reloaded, _ = int8_from_checkpoint(load_file(str(path)), metadata, str(path))
    assert torch.equal(reloaded(x), expected)


@pytest.mark.parametrize("pad_mode", ["reflect", "constant"])
@pytest.mark.parametrize(("filt_size", "stride"), [(3, 2), (5, 2), (3, 3)])
def test_blur_pool_is_timms(pad_mode, filt_size, stride):
    ours = BlurPool2d(5, stride, filt_size, pad_mode)
    theirs = TimmBlurPool2d(5, filt_size, stride, pad_mode)
    assert ours.state_dict() == {}  # nothing to load or save
    for size in (16, 15):  # even and odd sides
        x = _images(2, size)[:, :1].repeat(1, 5, 1, 1)
        # the same binomial filter as timm's conv, as box filters: sums in another order
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-6)


def test_depth_rule_is_timms_ceil_and_share():
    # a stage's total goes up to ceil(n * depth), shared out from its last kind first,
    # Python rounding half to even: V3-Large's 80-wide stage, kinds of 1, 1 and 2 layers
    assert scale_depth([1, 1, 2], 1.2) == [1, 2, 2]  # 5 layers: round(2.5) = 2, round(1.5) = 2
    assert [scale_depth([n], 1.2)[0] for n in (1, 2, 3, 4)] == [2, 3, 4, 5]
    assert [scale_depth([n], 1.4)[0] for n in (2, 3, 4)] == [3, 5, 6]
    assert deepen(V2_TABLE_2, 1.0) == V2_TABLE_2
    repeats = [row.n for row in deepen(V2_TABLE_2, 1.2, fix_first_last=True)]
    assert repeats == [1, 3, 4, 5, 4, 4, 1]  # timm's mobilenetv2_110d, stage by stage
    assert deepen_v3(V3_LARGE, 1.0) == V3_LARGE and deepen_v3(V3_SMALL, 1.0) == V3_SMALL
    deep = deepen_v3(V3_LARGE, 1.2)
    widths = [row.out for row in deep.bnecks]
    assert [widths.count(c) for c in (16, 24, 40, 80, 112, 160)] == [2, 3, 4, 5, 3, 4]
    assert deep.last_n == 2
    assert [row.exp for row in deep.bnecks if row.out == 80] == [240, 200, 200, 184, 184]
    # a kind grows by its last row; a stage's first row, repeated, keeps its expansion
    # ratio on its own width at stride 1: 64 / 16 -> 96 / 24 (timm: ir_r2_k3_s2_e4_c24)
    rows = [(row.exp, row.s) for row in deepen_v3(V3_LARGE, 2.0).bnecks if row.out == 24]
    assert rows == [(64, 2), (96, 1), (72, 1), (72, 1)]


def test_listed(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for ours, _, _ in FAMILY:
        assert ours in out
