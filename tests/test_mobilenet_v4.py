"""MobileNetV4: the five models, timm interop for every timm V4 architecture, the blocks."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from mobilenet import cost, create_model, list_models, load_weights, save_weights
from mobilenet.blocks import MobileMQA, UniversalInvertedBottleneck
from mobilenet.errors import MobileNetError
from mobilenet.models.mobilenet_v4 import MobileNetV4

from .helpers import randomize_bn, recalibrate_bn, unit_scale_logits

V4 = [
    "mobilenet_v4_conv_small",
    "mobilenet_v4_conv_medium",
    "mobilenet_v4_conv_large",
    "mobilenet_v4_hybrid_medium",
    "mobilenet_v4_hybrid_large",
]
# timm name, ours, width, native resolution
TIMM_V4 = [
    ("mobilenetv4_conv_small", "mobilenet_v4_conv_small", 1.0, 224),
    ("mobilenetv4_conv_small_035", "mobilenet_v4_conv_small", 0.35, 224),
    ("mobilenetv4_conv_small_050", "mobilenet_v4_conv_small", 0.5, 224),
    ("mobilenetv4_conv_medium", "mobilenet_v4_conv_medium", 1.0, 256),
    ("mobilenetv4_conv_large", "mobilenet_v4_conv_large", 1.0, 384),
    ("mobilenetv4_hybrid_medium", "mobilenet_v4_hybrid_medium", 1.0, 256),
    ("mobilenetv4_hybrid_medium_075", "mobilenet_v4_hybrid_medium", 0.75, 256),
    ("mobilenetv4_hybrid_large", "mobilenet_v4_hybrid_large", 1.0, 384),
    ("mobilenetv4_hybrid_large_075", "mobilenet_v4_hybrid_large", 0.75, 384),
]


def _timm_reference(name: str, resolution: int) -> nn.Module:
    """A timm V4 with random weights whose every part matters to the output: random
    layer scales (1e-5 at init would hide the residual branches) and BatchNorm
    statistics of images at ``resolution`` (statistics of another size let activations
    grow 1000x in the deep stages, and float rounding with them), then logits brought
    to unit scale."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False)
    with torch.no_grad():
        for pname, p in ref.named_parameters():
            if pname.endswith("layer_scale.gamma"):
                p.uniform_(0.5, 1.0)
    ref = recalibrate_bn(randomize_bn(ref), resolution=resolution)
    return unit_scale_logits(ref, ref.get_classifier(), resolution=resolution)


@pytest.mark.parametrize(("ref_name", "ours", "width", "native"), TIMM_V4)
def test_timm_v4_state_dict_gives_identical_outputs(ref_name, ours, width, native, tmp_path):
    ref = _timm_reference(ref_name, native)
    path = tmp_path / "model.safetensors"  # as the Hugging Face hub ships timm weights
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_model(ours, width_mult=width)
    assert load_weights(model, path) == "timm"
    assert model.config.bn_eps == 1e-5  # timm's V4 trained with PyTorch's default
    model.eval()
    for resolution, batch in ((native, 1), (160, 2)):
        x = torch.randn(
            batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            expected, actual = ref(x), model(x)
        assert expected.abs().max() > 1e-2  # real signals, not zeros
        assert (expected - actual).abs().max().item() <= 1e-5


def test_v1_v3_timm_checkpoints_are_not_read_as_v4():
    sd = timm.create_model("mobilenetv3_small_050").state_dict()
    with pytest.raises(MobileNetError):
        load_weights(create_model("mobilenet_v4_conv_small"), sd)


def test_own_file_round_trip(tmp_path):
    model = randomize_bn(create_model("mobilenet_v4_hybrid_medium", width_mult=0.5, num_classes=7))
    path = save_weights(model, tmp_path / "v4.safetensors")
    loaded = create_model("mobilenet_v4_hybrid_medium", weights=path)
    assert loaded.config == model.config and isinstance(loaded, MobileNetV4)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_registry_and_eval_resolutions():
    assert [name for name in list_models() if name in V4] == V4
    resolutions = [create_model(name).eval_config.resolution for name in V4]
    assert resolutions == [224, 256, 384, 256, 384]  # V4 Table 5


@pytest.mark.parametrize("name", V4)
def test_forward_at_two_resolutions_and_feature_maps(name):
    model = create_model(name, width_mult=0.5, num_classes=5).eval()
    with torch.no_grad():
        for height, width in ((64, 64), (100, 76)):  # any size, odd maps included
            x = torch.randn(2, 3, height, width)
            maps = model.feature_maps(x)
            assert list(maps) == [2, 4, 8, 16, 32]
            for info in model.feature_info:
                assert maps[info.stride].shape[1] == info.channels
            logits = model.forward_head(maps[32])
            assert logits.shape == (2, 5) and torch.isfinite(logits).all()
            torch.testing.assert_close(model(x), logits)


@pytest.mark.parametrize("name", V4)
def test_backward_reaches_every_parameter(name):
    model = create_model(name, width_mult=0.35, num_classes=3).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", V4)
def test_batch_one_in_eval_and_torch_export(name):
    model = randomize_bn(create_model(name, width_mult=0.35, num_classes=4)).eval()
    x = torch.randn(3, 3, 64, 64)
    exported = torch.export.export(model, (x[:1],)).module()
    with torch.no_grad():
        batched = model(x)
        torch.testing.assert_close(model(x[1:2]), batched[1:2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(exported(x[:1]), batched[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", V4)
def test_onnx_export_checked_by_onnxruntime(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from mobilenet.export import export_onnx

    model = create_model(name, width_mult=0.35, num_classes=10)
    model = recalibrate_bn(randomize_bn(model), resolution=64)
    model = unit_scale_logits(model, model.classifier, resolution=64)
    assert export_onnx(model, tmp_path / "v4.onnx", 64) <= 1e-4


def test_uib_instances_and_hybrid_blocks():
    model = create_model("mobilenet_v4_hybrid_medium")
    uibs = [m for m in model.features if isinstance(m, UniversalInvertedBottleneck)]
    kinds = {
        (not isinstance(b.dw_start, nn.Identity), not isinstance(b.dw_mid, nn.Identity))
        for b in uibs
    }
    assert kinds == {(True, True), (True, False), (False, False)}  # ExtraDW, ConvNext, FFN
    mqas = [m for m in model.features if isinstance(m, MobileMQA)]
    assert len(mqas) == 8 and all(isinstance(m.add, nn.Module) for m in mqas)
    assert [m.attn.key.out_channels for m in mqas] == [64] * 8  # one shared key head
    assert [m.attn.query.out_channels for m in mqas] == [256] * 8  # 4 heads x 64
    conv_s = create_model("mobilenet_v4_conv_small")
    ib = [m for m in conv_s.features if isinstance(m, UniversalInvertedBottleneck)]
    assert sum(isinstance(b.dw_start, nn.Identity) for b in ib) == 8  # IB rows
    assert all(isinstance(b.layer_scale, nn.Identity) for b in ib)  # conv models: none


def test_query_downsampling_keeps_the_map_size():
    block = MobileMQA(32, 32, heads=2, key_dim=16, kv_stride=2, query_stride=2, layer_scale=1e-5)
    assert block(torch.randn(2, 32, 8, 8)).shape == (2, 32, 8, 8)


def test_ffn_cannot_downsample():
    with pytest.raises(MobileNetError, match="FFN"):
        UniversalInvertedBottleneck(16, 32, 16, 0, 0, stride=2)


# name, resolution, params, MAdds (M, one decimal), of which attention; paper (V4 Table 5)
COSTS = [
    ("mobilenet_v4_conv_small", 224, 3_774_024, 186.0, 0),  # 3.8M / 0.2G
    ("mobilenet_v4_conv_medium", 256, 9_715_512, 1080.2, 0),  # 9.2M / 1.0G
    ("mobilenet_v4_conv_large", 384, 32_590_864, 6376.2, 0),  # 31M / 5.9G
    ("mobilenet_v4_hybrid_medium", 256, 11_074_648, 1271.2, 41_943_040),  # 10.5M / 1.2G
    ("mobilenet_v4_hybrid_large", 384, 37_764_624, 7711.9, 339_738_624),  # 35.9M / 7.2G
]


@pytest.mark.parametrize(("name", "resolution", "params", "madds_m", "attention"), COSTS)
def test_golden_params_and_madds(name, resolution, params, madds_m, attention):
    c = cost(name, resolution)
    assert c.params == params  # timm's count of the same architecture, to the parameter
    assert round(c.madds / 1e6, 1) == madds_m
    assert c.by_type["attention"]["madds"] == attention


def test_attention_madds_by_hand():
    # 4 heads of 64 over a 16x16 map, keys and values from the 8x8 map of a stride-2 dw conv
    block = MobileMQA(160, 160, heads=4, key_dim=64, kv_stride=2)
    layers = cost(_Features(block), 16).layers
    (attention,) = [layer for layer in layers if layer.type == "attention"]
    assert attention.madds == 4 * 256 * 64 * (64 + 64)  # Q K^T and A V
    convs = {layer.name.removeprefix("block.attn."): layer.madds for layer in layers}
    assert convs["query"] == 256 * 160 * 256 and convs["key"] == 64 * 160 * 64
    assert convs["output"] == 256 * 256 * 160


class _Features(nn.Module):
    """A 160-channel feature map from an image, for costing one block on its own."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 160, 1)
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.stem(x))
