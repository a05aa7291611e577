import pytest
import torch
from torch import nn

import mobilenet
from mobilenet import MobileNetError, create_model, list_models
from mobilenet.blocks import InvertedResidual

from .helpers import TIMM_VARIANTS, paper_models, randomize_bn

ALL = paper_models()


def test_registry_holds_every_variant():
    v5 = ["mobilenet_v5_300m", "mobilenet_v5_base"]
    assert sorted(list_models()) == sorted([*ALL, *TIMM_VARIANTS, *v5])
    assert list_models(task="encoder") == ["mobilenet_v5_300m_enc"]  # features, no classes
    assert ALL == [
        "mobilenet_v1",
        "mobilenet_v1_conv",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "mobilenet_v3_small",
        "mobilenet_v3_large_minimal",
        "mobilenet_v3_small_minimal",
        "mobilenet_v4_conv_small",
        "mobilenet_v4_conv_medium",
        "mobilenet_v4_conv_large",
        "mobilenet_v4_hybrid_medium",
        "mobilenet_v4_hybrid_large",
    ]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("resolution", [224, 96])
def test_forward_shapes(name, resolution):
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert features.shape == (
        2,
        model.feature_info[-1].channels,
        resolution // 32,
        resolution // 32,
    )
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name):
    # In training mode every parameter is on the graph. Its gradient is checked in eval mode
    # (randomised statistics): a train-mode BatchNorm removes any per-channel shift before it,
    # so a bias feeding one gets a gradient that is zero up to rounding, on some CPUs exactly.
    torch.manual_seed(0)
    model = create_model(name, num_classes=5).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(1).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.zero_grad(set_to_none=True)
    randomize_bn(model).eval()
    with torch.no_grad():  # layer scales of a trained size: 1e-5 leaves gradients near 1e-28
        for pname, p in model.named_parameters():
            if pname.endswith("layer_scale.gamma"):
                p.fill_(0.5)
    model(x).logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ALL)
def test_batch_one_eval_matches_batched(name):
    model = randomize_bn(create_model(name)).eval()
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        batched = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(single, batched[1:2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_torch_export(name):
    model = create_model(name, width_mult=0.5, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", ALL)
def test_feature_maps_at_every_output_stride(name):
    model = create_model(name, width_mult=0.75).eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        maps = model.feature_maps(x)
        last = model.forward_features(x)
    assert list(maps) == [2, 4, 8, 16, 32]
    for info in model.feature_info:
        assert maps[info.stride].shape == (1, info.channels, 128 // info.stride, 128 // info.stride)
    torch.testing.assert_close(maps[32], last)


def test_stage_boundaries_are_marked_on_blocks():
    model = create_model("mobilenet_v2")
    strides = [layer.stride for layer in model.features]
    # V2 Table 2: stem s2, then the first repeat of rows 3, 4, 5 and 7 has stride 2.
    assert [i for i, s in enumerate(strides) if s == 2] == [0, 2, 4, 7, 14]
    assert [info.index for info in model.feature_info] == [1, 3, 6, 13, 18]


@pytest.mark.parametrize("width", [0.25, 0.35, 0.5, 0.75, 1.3, 1.4])
def test_v2_width_multiplier_channels(width):
    import torchvision

    ours = create_model("mobilenet_v2", width_mult=width)
    ref = torchvision.models.mobilenet_v2(width_mult=width)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    last = ours.features[-1].out_channels
    assert last == (1280 if width <= 1 else ref.last_channel)  # never thinned


def test_v1_width_multiplier_thins_every_layer():
    model = create_model("mobilenet_v1", width_mult=0.25)
    assert [layer.out_channels for layer in model.features][:3] == [8, 16, 32]
    assert model.feature_info[-1].channels == 256


def test_v3_large_table_1():
    model = create_model("mobilenet_v3_large")
    blocks = [b for b in model.features if isinstance(b, InvertedResidual)]
    exp = [b.dw.conv.out_channels for b in blocks]
    assert exp == [16, 64, 72, 72, 120, 120, 240, 200, 184, 184, 480, 672, 672, 960, 960]
    assert [b.dw.conv.kernel_size[0] for b in blocks] == [
        3,
        3,
        3,
        5,
        5,
        5,
        3,
        3,
        3,
        3,
        3,
        3,
        5,
        5,
        5,
    ]
    assert [not isinstance(b.se, nn.Identity) for b in blocks] == [False] * 3 + [True] * 3 + [
        False
    ] * 4 + [True] * 5
    # Stride 2 on the first 160-channel block (the seed code has it on the second).
    assert [b.stride for b in blocks].index(2, 7) == 12
    assert isinstance(blocks[0].expand, nn.Identity)
    assert isinstance(model.pre_logits.fc, nn.Linear) and model.pre_logits.fc.out_features == 1280


def test_minimal_variants_have_no_se_no_hswish_and_3x3_only():
    for name in ("mobilenet_v3_large_minimal", "mobilenet_v3_small_minimal"):
        model = create_model(name)
        kinds = {type(m) for m in model.modules()}
        assert nn.Hardswish not in kinds and mobilenet.layers.SqueezeExcite not in kinds
        assert {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)} <= {
            (1, 1),
            (3, 3),
        }


def test_v1_conv_replaces_depthwise_separable_layers_by_full_convs():
    model = create_model("mobilenet_v1_conv")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 14 and all(c.groups == 1 and c.kernel_size == (3, 3) for c in convs)


def test_reset_classifier():
    model = create_model("mobilenet_v3_small")
    model.reset_classifier(3)
    assert model.classifier.out_features == 3 and model.config.num_classes == 3
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1024)


def test_forward_head_pre_logits():
    model = create_model("mobilenet_v3_large").eval()
    x = model.forward_features(torch.randn(1, 3, 64, 64))
    assert model.forward_head(x, pre_logits=True).shape == (1, 1280)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "mobilenet_v4"}, "unknown model"),
        ({"name": "mobilenet_v2", "width_mult": 0}, "width multiplier"),
        ({"name": "mobilenet_v2", "width_mult": -1.0}, "width multiplier"),
        ({"name": "mobilenet_v2", "num_classes": -3}, "num_classes"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(MobileNetError, match=message):
        create_model(**kwargs)
