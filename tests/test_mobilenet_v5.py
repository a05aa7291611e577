"""MobileNetV5 (Gemma 3n's encoder): timm parity of the three models, its blocks, its
layout and the uniform model API."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import RmsNorm2d as TimmRmsNorm2d
from timm.models.mobilenetv5 import MobileNetV5MultiScaleFusionAdapter
from torch import nn

from mobilenet import create_model, list_models, load_weights, save_weights
from mobilenet.blocks import MobileMQA, MultiScaleFusionAdapter
from mobilenet.errors import CheckpointError, MobileNetError
from mobilenet.layers import GELUTanh, RmsNorm2d
from mobilenet.models.mobilenet_v5 import MobileNetV5, MobileNetV5Encoder
from mobilenet.models.v5_layouts import GEMMA_PREFIX

from .helpers import randomize_v5

V5 = ["mobilenet_v5_300m", "mobilenet_v5_300m_enc", "mobilenet_v5_base"]
TIMM = {name: name.replace("mobilenet_v5", "mobilenetv5") for name in V5}  # timm's names


def _timm_reference(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomize_v5(timm.create_model(name, pretrained=False, **kwargs))


def _assert_same(ref: nn.Module, model: nn.Module, sizes, batch: int = 2) -> None:
    """The MSFA maps (``forward_features``) agree, and so do the heads' outputs on them
    (but for the encoder, which has none): to 1e-4 of outputs of unit scale."""
    for height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected, actual = ref.forward_features(x), model.forward_features(x)
            pairs = [(expected, actual)]
            if not isinstance(model, MobileNetV5Encoder):
                pairs.append((ref.forward_head(expected), model.forward_head(actual)))
        for expected, actual in pairs:
            assert expected.abs().max() > 1e-2  # real signals, not zeros
            assert expected.shape == actual.shape
            scale = max(1.0, expected.abs().max().item())
            assert (expected - actual).abs().max().item() <= 1e-4 * scale


# ours, build options (timm's the same), input sizes (height, width), batch
PARITY = [
    pytest.param("mobilenet_v5_base", {}, [(64, 64)], 2, id="base-64"),
    pytest.param(
        "mobilenet_v5_300m_enc",
        {},
        [(256, 256), (100, 76)],
        1,
        id="300m_enc-256-100x76",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "mobilenet_v5_300m",
        {"num_classes": 10},
        [(256, 256)],
        1,
        id="300m-256",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "mobilenet_v5_base",
        {},
        [(100, 76), (76, 130)],
        2,
        id="base-nonsquare",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("ours", "options", "sizes", "batch"), PARITY)
def test_timm_state_dict_gives_timms_outputs(ours, options, sizes, batch):
    ref = _timm_reference(TIMM[ours], **options)
    model = create_model(ours, **options)
    assert load_weights(model, ref.state_dict()) == "timm"
    assert model.config.padding == ("same" if ours.endswith("_enc") else "symmetric")
    _assert_same(ref, model.eval(), sizes, batch)


@pytest.mark.parametrize(
    ("ours", "width", "classes"),
    [("mobilenet_v5_base", 0.5, 1000), ("mobilenet_v5_300m_enc", 0.25, 0)],
)
def test_timm_file_loads_by_create_model(ours, width, classes, tmp_path):
    ref = _timm_reference(TIMM[ours], channel_multiplier=width)
    path = tmp_path / "model.safetensors"  # as the Hugging Face hub ships timm weights
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_model(ours, weights=path, width_mult=width).eval()
    assert model.config.num_classes == classes  # read from the file
    _assert_same(ref, model, [(64, 64)])


def test_load_weights_and_gemma_checkpoint_names():
    ref = _timm_reference("mobilenetv5_base", channel_multiplier=0.25)
    model = create_model("mobilenet_v5_base", width_mult=0.25)
    assert load_weights(model, ref.state_dict()) == "timm"
    _assert_same(ref, model.eval(), [(48, 80)])
    # Gemma 3n's files: the encoder under a prefix, beside the language model's tensors
    gemma = {GEMMA_PREFIX + k: v for k, v in ref.state_dict().items() if "classifier" not in k}
    gemma["model.language_model.embed_tokens.weight"] = torch.zeros(3, 2)
    encoder = create_model("mobilenet_v5_base", width_mult=0.25, num_classes=0)
    assert load_weights(encoder, gemma) == "timm"
    torch.testing.assert_close(encoder.msfa.norm.weight, ref.msfa.norm.weight)


def _meta_state_dict(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).state_dict()


@pytest.mark.parametrize(
    ("timm_name", "ours", "fits"),
    [
        ("mobilenetv5_base", "mobilenet_v5_300m_enc", "mobilenet_v5_base"),
        ("mobilenetv5_300m", "mobilenet_v5_base", "mobilenet_v5_300m or mobilenet_v5_300m_enc"),
    ],
)
def test_another_sizes_state_dict_is_refused_in_one_line(timm_name, ours, fits):
    with torch.device("meta"):
        model = create_model(ours, num_classes=0)
    with pytest.raises(CheckpointError) as error:
        load_weights(model, _meta_state_dict(timm_name))
    message = str(error.value)
    assert "\n" not in message and f"a timm {timm_name} state dict" in message
    assert message.endswith(f"it fits {fits}")


def test_v4_models_do_not_read_v5_state_dicts():
    with pytest.raises(MobileNetError, match="unrecognised checkpoint layout"):
        load_weights(create_model("mobilenet_v4_conv_small"), _meta_state_dict("mobilenetv5_base"))


@pytest.mark.parametrize("ours", V5)
def test_parameter_counts_equal_timms(ours):
    with torch.device("meta"):
        model = create_model(ours)
        ref = timm.create_model(TIMM[ours], pretrained=False)
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert count == {"mobilenet_v5_base": 82_647_976}.get(ours, 294_126_912)  # 294.13M


def test_drop_path_follows_timms_schedule():
    with torch.device("meta"):
        model = create_model("mobilenet_v5_base", drop_path_rate=0.2)
        ref = timm.create_model("mobilenetv5_base", pretrained=False, drop_path_rate=0.2)
    ours = [getattr(b.drop_path, "p", 0.0) for b in model.features[1:]]
    theirs = [getattr(b.drop_path, "drop_prob", 0.0) for stage in ref.blocks for b in stage]
    residual = [b.use_residual for b in model.features[1:]]
    assert ours == [rate if res else 0.0 for rate, res in zip(theirs, residual, strict=True)]
    assert max(ours) > 0.18


def test_registry_and_eval_configs():
    assert set(V5) <= set(list_models(task=None))
    assert list_models(task="encoder") == ["mobilenet_v5_300m_enc"]  # `mobilenet list` says so
    assert create_model("mobilenet_v5_300m_enc", width_mult=0.25).eval_config.resolution == 768
    base = create_model("mobilenet_v5_base", width_mult=0.25).eval_config
    assert (base.resolution, base.crop_pct, base.mean) == (256, 1.0, (0.5, 0.5, 0.5))
    with pytest.raises(MobileNetError, match="encoder without a classifier"):
        create_model("mobilenet_v5_300m_enc", num_classes=10)


def test_model_api_feature_maps_and_msfa_map():
    model = randomize_v5(create_model("mobilenet_v5_base", width_mult=0.25, num_classes=5))
    assert isinstance(model, MobileNetV5)
    x = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        maps = model.feature_maps(x)
        assert list(maps) == [2, 4, 8, 16, 32]
        for info in model.feature_info:
            assert maps[info.stride].shape[1] == info.channels
        features = model.forward_features(x)
        assert features.shape == (2, 2048, 16, 16)  # the MSFA's, whatever the input
        torch.testing.assert_close(model(x), model.forward_head(features))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_encoder_forward_is_the_msfa_map_and_backward_reaches_every_parameter():
    model = create_model("mobilenet_v5_300m_enc", width_mult=0.25, drop_path_rate=0.1)
    assert isinstance(model, MobileNetV5Encoder) and model.config.padding == "same"
    out = model.train()(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2048, 16, 16)
    out.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    mqa = [m for m in model.features if isinstance(m, MobileMQA)]
    assert len(mqa) == 33 and {m.attn.heads for m in mqa} == {12, 16}
    assert {m.attn.key.out_channels for m in mqa} == {64, 96}  # one shared key head


def test_own_file_round_trip_keeps_padding(tmp_path):
    model = randomize_v5(create_model("mobilenet_v5_300m_enc", width_mult=0.25))
    path = save_weights(model, tmp_path / "v5.safetensors")
    loaded = create_model("mobilenet_v5_300m_enc", weights=path).eval()
    assert loaded.config == model.config and isinstance(loaded, MobileNetV5Encoder)
    x = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_torch_export_matches_eager():
    model = randomize_v5(create_model("mobilenet_v5_base", width_mult=0.25, num_classes=4))
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_and_gelu_tanh_equal_timms():
    x = torch.randn(2, 24, 5, 7) * 3
    ours, theirs = RmsNorm2d(24), TimmRmsNorm2d(24)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    assert torch.equal(ours(x), theirs(x)) and ours.eps == theirs.eps == 1e-6
    assert torch.equal(GELUTanh()(x), nn.GELU(approximate="tanh")(x))


# (stride-16 map, stride-32 map): no resize; average pool by 3 and by (2, 1); bilinear
# up from a smaller map and from a side that is not a multiple of 16.
MSFA_SIZES = [((16, 16), (8, 8)), ((48, 48), (24, 24)), ((32, 16), (16, 8)), ((7, 5), (4, 3))]


@pytest.mark.parametrize(("high", "low"), MSFA_SIZES)
def test_msfa_equals_timms(high, low):
    torch.manual_seed(0)
    ref = MobileNetV5MultiScaleFusionAdapter([16, 24], 32, 16).eval()
    ours = MultiScaleFusionAdapter(40, 32, 16, act=GELUTanh, norm=RmsNorm2d).eval()
    randomize_v5(ref)
    names = {"pw_exp": "expand", "pw_proj": "project"}
    state = {}
    for key, tensor in ref.state_dict().items():
        for theirs, mine in names.items():
            key = key.replace(f"ffn.{theirs}.", f"ffn.{mine}.")
        state[key] = tensor
    ours.load_state_dict(state)
    maps = [torch.randn(2, 16, *high), torch.randn(2, 24, *low)]
    with torch.no_grad():
        expected, actual = ref(maps), ours(maps)
    assert actual.shape == (2, 32, 16, 16)
    assert torch.equal(actual, expected)
