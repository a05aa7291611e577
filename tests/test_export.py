"""Deployment: BatchNorm folding and ONNX / TorchScript export checked against PyTorch."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilenet import MobileNetError, create_model, save_weights
from mobilenet.blocks import MobileMQA
from mobilenet.cli import main
from mobilenet.export import export_onnx, fold_batchnorm, onnx_session, prepare_for_inference
from mobilenet.export.prepare import attention_norm_foldable

from .helpers import paper_models, randomize_bn, recalibrate_bn, unit_scale_logits


def _unfoldable(model: torch.nn.Module) -> int:
    """BatchNorms with no conv before them and none after them to fold into exactly: the
    pre-norm of V4's Mobile MQA blocks whose keys and values are downsampled first."""
    mqa = [m for m in model.modules() if isinstance(m, MobileMQA)]
    return sum(not attention_norm_foldable(m) for m in mqa)


@pytest.mark.parametrize("name", ["mobilenet_v4_hybrid_medium", "mobilenet_v4_hybrid_large"])
def test_attention_pre_norm_folded_into_the_projections(name):
    model = _model(name, width_mult=0.75 if "large" in name else 1.0)
    blocks = [m for m in model.modules() if isinstance(m, MobileMQA)]
    # V4 Section 4.2: keys and values downsampled (kv_stride 2) at output stride 16, not at
    # 32, where the projections read the pre-norm directly.
    foldable = [attention_norm_foldable(m) for m in blocks]
    assert foldable == [False] * 4 + [True] * 4
    folded = fold_batchnorm(__import__("copy").deepcopy(model))
    norms = [m.norm for m in folded.modules() if isinstance(m, MobileMQA)]
    assert [isinstance(n, torch.nn.Identity) for n in norms] == foldable
    for block in [m for m in folded.modules() if isinstance(m, MobileMQA)][4:]:
        assert all(getattr(block.attn, p).bias is not None for p in ("query", "key", "value"))
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    assert expected.std() > 0.5
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)  # as every fold


def _model(name: str, **kwargs):
    model = recalibrate_bn(randomize_bn(create_model(name, **kwargs)), resolution=64)
    return unit_scale_logits(model, model.classifier)


@pytest.mark.parametrize("name", paper_models())
def test_batchnorm_folding_is_exact(name):
    model = _model(name)
    prepared = prepare_for_inference(model)
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in prepared.modules())
    assert left == _unfoldable(model)
    assert all(not p.requires_grad for p in prepared.parameters())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # a copy
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(
            prepared(x.to(memory_format=torch.channels_last)), model(x), atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("name", paper_models())
@pytest.mark.parametrize("resolution", [224, 128])
def test_onnx_runtime_matches_pytorch(name, resolution, tmp_path):
    model = _model(name)
    path = tmp_path / f"{name}.onnx"
    reported = export_onnx(model, path, resolution)
    session = onnx_session(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, resolution, resolution)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = session.run(None, {"images": x.numpy()})[0]
        assert actual.shape == (batch, 1000)
        assert np.abs(actual - expected).max() <= 1e-4
    assert reported <= 1e-4
    nodes = __import__("onnx").load(str(path)).graph.node
    ops = {node.op_type for node in nodes}
    # folded before export, but for the pre-norms with no conv before them
    assert sum(n.op_type == "BatchNormalization" for n in nodes) == _unfoldable(model)
    if name == "mobilenet_v3_large":
        assert {"HardSwish", "HardSigmoid"} <= ops  # standard ops, no custom ones


def test_export_cli_with_trained_weights_and_torchscript(tmp_path, capsys):
    model = _model("mobilenet_v3_small", num_classes=4)
    weights = save_weights(model, tmp_path / "w.safetensors", {"classes": '["a","b","c","d"]'})
    out = tmp_path / "m.onnx"
    args = ["export", "--model", "mobilenet_v3_small", "--weights", str(weights)]
    assert main([*args, "--out", str(out), "--resolution", "96"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    session = onnx_session(out)
    x = torch.randn(5, 3, 96, 96)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - expected).max() <= 1e-4
    ts = tmp_path / "m.pt"
    assert main([*args, "--format", "torchscript", "--out", str(ts), "--resolution", "96"]) == 0
    loaded = torch.jit.load(str(ts))
    torch.testing.assert_close(loaded(x), torch.from_numpy(expected), atol=1e-4, rtol=0)


def test_export_refuses_bad_weights_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    out = tmp_path / "m.onnx"
    code = main(["export", "--model", "mobilenet_v2", "--weights", str(bad), "--out", str(out)])
    assert code == 2 and "not a readable checkpoint" in capsys.readouterr().err
    other = save_weights(create_model("mobilenet_v3_small"), tmp_path / "small.safetensors")
    code = main(["export", "--model", "mobilenet_v2", "--weights", str(other), "--out", str(out)])
    assert code == 2 and "mobilenet_v3_small" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "small.safetensors"]


def test_a_failed_check_leaves_no_file(tmp_path, monkeypatch):
    import mobilenet.export.check as check

    monkeypatch.setattr(check, "TOLERANCE", -1.0)
    with pytest.raises(MobileNetError, match="nothing written"):
        export_onnx(_model("mobilenet_v3_small"), tmp_path / "m.onnx", 64)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"definitely not protobuf")
    with pytest.raises(MobileNetError, match="not a model ONNX Runtime can load"):
        onnx_session(path)


def test_fold_batchnorm_in_place_keeps_outputs():
    model = _model("mobilenet_v2").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        fold_batchnorm(model)
        torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)


def test_predict_engines_agree_and_the_onnx_file_is_cached(tmp_path, capsys):
    import os

    from PIL import Image

    model = _model("mobilenet_v3_small", num_classes=3)
    weights = save_weights(model, tmp_path / "w.safetensors", {"classes": '["a","b","c"]'})
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
    results = {}
    for engine in ("onnxruntime", "eager-fused", "eager"):
        args = ["predict", "--weights", str(weights), str(image), "--engine", engine, "--json"]
        assert main([*args, "--resolution", "64"]) == 0
        results[engine] = json.loads(capsys.readouterr().out)[0]["top"]
    for engine in ("eager-fused", "eager"):
        assert [t["class"] for t in results[engine]] == [t["class"] for t in results["onnxruntime"]]
        for a, b in zip(results[engine], results["onnxruntime"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    cached = list((Path(os.environ["MOBILENET_HOME"]) / "onnx").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-64.onnx")
    stamp = cached[0].stat().st_mtime_ns
    assert main(["predict", "--weights", str(weights), str(image), "--resolution", "64"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp  # exported once, reused


def test_export_format_follows_the_suffix_and_a_contradiction_is_refused(tmp_path, capsys):
    base = ["export", "--model", "mobilenet_v1_conv", "--width-mult", "0.25", "--resolution", "32"]
    bad = tmp_path / "m.onnx"
    assert main([*base, "--format", "pt2", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == "mobilenet export: error: --format pt2 writes a .pt2 file, not m.onnx\n"
    assert not bad.exists()
    # No --format: the suffix names it (a .pt2 file holds a torch.export program).
    assert main([*base, "--out", str(tmp_path / "m.pt2")]) == 0
    assert "torch.export vs PyTorch" in capsys.readouterr().out
