"""TensorFlow's SAME padding, and the authors' checkpoints that need it (timm's tf_*)."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers.padding import pad_same

from mobilenet import CheckpointError, MobileNetError, create_model, load_weights, save_weights
from mobilenet.cli import main
from mobilenet.layers import ConvBNAct, same_padding

from .helpers import randomize_bn, recalibrate_bn, unit_scale_logits

TF_TIMM = [
    ("tf_mobilenetv3_large_075", "mobilenet_v3_large", 0.75),
    ("tf_mobilenetv3_large_100", "mobilenet_v3_large", 1.0),
    ("tf_mobilenetv3_large_minimal_100", "mobilenet_v3_large_minimal", 1.0),
    ("tf_mobilenetv3_small_075", "mobilenet_v3_small", 0.75),
    ("tf_mobilenetv3_small_100", "mobilenet_v3_small", 1.0),
    ("tf_mobilenetv3_small_minimal_100", "mobilenet_v3_small_minimal", 1.0),
]


def _timm(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    ref = recalibrate_bn(randomize_bn(timm.create_model(name)), resolution=64)
    return unit_scale_logits(ref, ref.get_classifier()).eval()


def _max_diff(ref: torch.nn.Module, model: torch.nn.Module, size: int) -> float:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected, actual = ref(x), model.eval()(x)
    assert expected.abs().max() > 0.1  # real signals, not BatchNorm-shrunk zeros
    return (expected - actual).abs().max().item()


def test_same_padding_is_tensorflows():
    assert same_padding(224, 3, 2) == (0, 1) and same_padding(224, 5, 2) == (1, 2)
    assert same_padding(225, 3, 2) == (1, 1) and same_padding(225, 5, 2) == (2, 2)
    assert same_padding(7, 3, 1) == (1, 1) and same_padding(7, 3, 1, dilation=2) == (2, 2)


@pytest.mark.parametrize("size", [7, 8, 9, 16])
@pytest.mark.parametrize(("kernel", "stride", "dilation"), [(3, 2, 1), (5, 2, 1), (3, 1, 2)])
def test_conv_same_matches_timm_pad_same(size, kernel, stride, dilation):
    layer = ConvBNAct(4, 4, kernel, stride, groups=4, act=None, dilation=dilation, padding="same")
    layer = randomize_bn(layer).eval()
    x = torch.randn(1, 4, size, size)
    padded = pad_same(x, [kernel, kernel], [stride, stride], [dilation, dilation])
    expected = layer.bn(F.conv2d(padded, layer.conv.weight, None, stride, 0, dilation, 4))
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-6)
    assert layer.pad is None if stride == 1 else layer.pad is not None  # static at stride 1


def test_padding_is_an_option_saved_and_restored(tmp_path):
    for name in ("mobilenet_v1", "mobilenet_v1_conv", "mobilenet_v2", "mobilenet_v3_small"):
        model = create_model(name, width_mult=0.25, padding="same")
        assert model.config.padding == "same"
        path = save_weights(model, tmp_path / f"{name}.safetensors")
        assert create_model(name, weights=path).config.padding == "same"
        plain = create_model(name, width_mult=0.25)  # symmetric, set by the file
        load_weights(plain, path)
        assert plain.config.padding == "same"
        x = torch.randn(1, 3, 65, 65)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x), model.eval()(x))
    with pytest.raises(MobileNetError, match="padding must be"):
        create_model("mobilenet_v2", padding="valid")


@pytest.mark.parametrize(("ref_name", "ours", "width"), TF_TIMM)
def test_timm_tf_models_give_identical_outputs(ref_name, ours, width, tmp_path):
    ref = _timm(ref_name)
    path = tmp_path / "model.safetensors"  # as the Hugging Face hub ships timm weights
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = create_model(ours, width_mult=width)  # symmetric: the checkpoint sets SAME
    assert load_weights(model, path, origin=f"timm:{ref_name}") == "timm"
    assert model.config.padding == "same" and model.config.bn_eps == 1e-3
    for size in (224, 225):
        assert _max_diff(ref, model, size) <= 1e-5
    assert model.eval_config.mean == (0.5, 0.5, 0.5)


def test_symmetric_padding_would_be_wrong():
    """The failure this option fixes: TF weights, PyTorch padding."""
    ref = _timm("tf_mobilenetv3_small_100")
    model = create_model("mobilenet_v3_small")
    load_weights(model, ref.state_dict(), origin="timm:tf_mobilenetv3_small_100")
    model.set_padding("symmetric")
    assert _max_diff(ref, model, 224) > 1e-2


def test_output_stride_with_same_padding_matches_timm_features():
    torch.manual_seed(0)
    full = recalibrate_bn(randomize_bn(timm.create_model("tf_mobilenetv3_large_100")), 64)
    ref = timm.create_model("tf_mobilenetv3_large_100", features_only=True, output_stride=16)
    ref.load_state_dict(full.state_dict(), strict=False)
    model = create_model("mobilenet_v3_large", output_stride=16)
    load_weights(model, full.state_dict(), origin="timm:tf_mobilenetv3_large_100")
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        expected, actual = ref.eval()(x), model.eval().feature_maps(x)
    assert (expected[-1] - actual[16]).abs().max() <= 1e-5


def test_ambiguous_timm_v3_is_refused_not_guessed(tmp_path):
    state_dict = timm.create_model("tf_mobilenetv3_large_075").state_dict()
    model = create_model("mobilenet_v3_large", width_mult=0.75)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="tf_mobilenetv3_large_075, which its tensors"):
        load_weights(model, state_dict)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.padding == "symmetric"
    # A timm name in the path says which; a bad origin is refused.
    path = tmp_path / "tf_mobilenetv3_large_075.pth"
    torch.save(state_dict, path)
    load_weights(model, path)
    assert model.config.padding == "same"
    with pytest.raises(CheckpointError, match="timm:MODEL"):
        load_weights(model, state_dict, origin="keras")


def test_unique_timm_kinds_need_no_origin():
    minimal = create_model("mobilenet_v3_small_minimal")
    load_weights(minimal, timm.create_model("tf_mobilenetv3_small_minimal_100").state_dict())
    assert minimal.config.padding == "same" and minimal.config.bn_eps == 1e-3
    small = create_model("mobilenet_v3_small", width_mult=0.5, padding="same")
    load_weights(small, timm.create_model("mobilenetv3_small_050").state_dict())
    assert small.config.padding == "symmetric" and small.config.bn_eps == 1e-5


def test_convert_from_timm_tf(tmp_path, capsys):
    ref = _timm("tf_mobilenetv3_small_075")
    src, dst = tmp_path / "ckpt.pth", tmp_path / "ours.safetensors"
    torch.save(ref.state_dict(), src)
    args = ["convert", str(src), str(dst), "--model", "mobilenet_v3_small", "--width-mult", "0.75"]
    assert main(args) == 2  # ambiguous: refused in one line, nothing written
    err = capsys.readouterr().err
    assert "--from timm:MODEL" in err and len(err.strip().splitlines()) == 1
    assert not dst.exists()
    assert main([*args, "--from", "timm:tf_mobilenetv3_small_075"]) == 0
    assert "same padding" in capsys.readouterr().out
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["padding"] == "same"
    assert json.loads(meta["preprocess"])["mean"] == [0.5, 0.5, 0.5]
    model = create_model("mobilenet_v3_small", weights=dst)
    assert model.config.bn_eps == 1e-3 and _max_diff(ref, model, 225) <= 1e-5
    # the card keeps what was named, and every reader of cards reads it (eval, predict)
    assert json.loads(meta["origin"]) == {
        "layout": "timm",
        "source": "timm:tf_mobilenetv3_small_075",
    }
    from mobilenet.classification.predict import load_trained

    assert load_trained(str(dst)).card.origin["source"] == "timm:tf_mobilenetv3_small_075"


@pytest.mark.parametrize("size", [224, 225])
def test_same_padding_exports_to_onnx(size, tmp_path):
    pytest.importorskip("onnxruntime")
    from mobilenet.export.onnx import export_onnx

    model = randomize_bn(create_model("mobilenet_v3_small", width_mult=0.5, padding="same"))
    assert export_onnx(model.eval(), tmp_path / "m.onnx", resolution=size) <= 1e-4


def test_same_padded_models_are_costed_and_traced():
    # The cost model (and the memory check eval, predict and export run first) traces the
    # model with torch.fx, which cannot branch on the input's size.
    from mobilenet import cost
    from mobilenet.cost import activation_memory

    same = create_model("mobilenet_v3_small", padding="same")
    symmetric = create_model("mobilenet_v3_small")
    for size in (224, 225):
        assert cost(same, size).madds == cost(symmetric, size).madds
        assert activation_memory(same, size).peak > activation_memory(symmetric, size).peak
    traced = torch.fx.symbolic_trace(same.eval())
    x = torch.randn(1, 3, 225, 225)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), same(x), rtol=0, atol=0)
