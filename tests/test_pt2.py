"""torch.export (.pt2) export: checked against PyTorch, loaded by eval/predict, and refused
in one line when damaged, foreign, or holding what torch.export.load would unpickle or run."""

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

from mobilenet import MobileNetError, create_model, save_weights
from mobilenet.blocks import MobileMQA
from mobilenet.classification.predict import load_trained
from mobilenet.cli import main
from mobilenet.export import export_pt2, read_pt2
from mobilenet.export.prepare import attention_norm_foldable

from .helpers import paper_models, randomize_bn, recalibrate_bn, unit_scale_logits

RES = 48


def _model(name: str, **kwargs):
    model = recalibrate_bn(randomize_bn(create_model(name, **kwargs)), resolution=RES)
    return unit_scale_logits(model, model.classifier, resolution=RES)


@pytest.mark.parametrize("name", paper_models())
def test_every_classifier_exports_and_matches_pytorch(name, tmp_path):
    model = _model(name, width_mult=0.5, num_classes=10)
    path = tmp_path / f"{name}.pt2"
    assert export_pt2(model, path, RES, {"classes": json.dumps(list("abcdefghij"))}) <= 1e-4
    program, metadata = read_pt2(path)
    assert metadata["resolution"] == str(RES)
    assert json.loads(metadata["config"])["name"] == name
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3, 5):  # 5: a batch size the export never saw
        x = torch.randn(batch, 3, RES, RES, generator=g)
        with torch.no_grad():
            expected = model(x)
            # The export's own rule: 1e-4 for unit-scale logits, growing with larger ones
            # (BatchNorm folding alone moves logits of 16 by ~1e-4 in float32).
            atol = 1e-4 * max(1.0, expected.abs().max().item())
            torch.testing.assert_close(program(x), expected, atol=atol, rtol=0)
    # folded, but for the pre-norms of V4's Mobile MQA blocks whose keys and values are
    # downsampled (no conv before them, a padded depthwise conv after them)
    norms = sum("batch_norm" in str(n.target) for n in program.graph.nodes)
    mqa = [m for m in model.modules() if isinstance(m, MobileMQA)]
    assert norms == sum(not attention_norm_foldable(m) for m in mqa)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    from mobilenet.classification.task import TrainConfig, train
    from mobilenet.train.recipes import get_recipe

    out = tmp_path_factory.mktemp("digits") / "run"
    recipe = get_recipe("demo", epochs=1, batch_size=64, resolution=32)
    train(TrainConfig("mobilenet_v3_small", "digits", out, recipe, workers=0, progress=False))
    return out / "best.safetensors"


def test_eval_and_predict_of_a_trained_model_match_its_safetensors(digits_run, tmp_path, capsys):
    out = tmp_path / "digits.pt2"
    args = ["export", "--model", "mobilenet_v3_small", "--weights", str(digits_run)]
    assert main([*args, "--format", "pt2", "--out", str(out)]) == 0
    assert "torch.export vs PyTorch" in capsys.readouterr().out
    results = {}
    for weights in (digits_run, out):
        common = ["--weights", str(weights), "--model", "mobilenet_v3_small"]
        assert main(["eval", *common, "--data", "digits", "--json"]) == 0
        results[weights.suffix] = json.loads(capsys.readouterr().out)
    assert results[".pt2"]["top1"] == results[".safetensors"]["top1"]
    assert results[".pt2"]["images"] == results[".safetensors"]["images"] > 0
    assert abs(results[".pt2"]["loss"] - results[".safetensors"]["loss"]) < 1e-4
    trained = load_trained(str(out))
    float_model = load_trained(str(digits_run))
    assert trained.classes == float_model.classes and trained.resolution == 32
    image = tmp_path / "seven.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    common = ["--model", "mobilenet_v3_small", str(image), "--json"]
    tops = []
    for weights in (digits_run, out):
        assert main(["predict", "--weights", str(weights), *common]) == 0
        tops.append(json.loads(capsys.readouterr().out)[0]["top"][0]["class"])
    assert tops[0] == tops[1]


def test_torchscript_still_exports_with_one_deprecation_line(tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["export", "--model", "mobilenet_v3_small", "--width-mult", "0.5"]
    args += ["--resolution", str(RES), "--format", "torchscript"]
    assert main([*args, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "TorchScript vs PyTorch" in captured.out
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "deprecated" in lines[0] and "--format pt2" in lines[0]
    assert out.is_file()


def test_a_refused_export_writes_nothing(tmp_path, monkeypatch):
    import mobilenet.export.check as check

    monkeypatch.setattr(check, "TOLERANCE", -1.0)
    with pytest.raises(MobileNetError, match="nothing written"):
        export_pt2(_model("mobilenet_v3_small", width_mult=0.5), tmp_path / "m.pt2", RES)
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_or_foreign_pt2_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"definitely not a zip archive")
    with pytest.raises(MobileNetError, match=r"not a \.pt2 archive"):
        load_trained(str(broken))
    good = tmp_path / "good.pt2"
    export_pt2(_model("mobilenet_v3_small", width_mult=0.5), good, RES)
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MobileNetError, match=r"truncated\.pt2: "):
        load_trained(str(truncated))
    plain = tmp_path / "plain.pt2"  # a torch.export file without our metadata
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(2, 3),))
    torch.export.save(program, plain)
    with pytest.raises(MobileNetError, match=r"not a \.pt2 file written by mobilenet export"):
        load_trained(str(plain))
    for path in (broken, truncated, plain):
        args = ["eval", "--model", "mobilenet_v3_small", "--weights", str(path)]
        assert main([*args, "--data", "digits"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mobilenet eval: error: ")


def _rewrite(source: Path, target: Path, change) -> None:
    """A copy of a .pt2 archive with ``change(name, data) -> data | None`` applied to each
    record (None drops it)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename.split("/", 1)[1], zin.read(info))
            if data is not None:
                zout.writestr(info, data)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_what_torch_export_load_would_unpickle_or_run_is_refused(tmp_path, capsys):
    good = tmp_path / "good.pt2"
    export_pt2(_model("mobilenet_v3_small", width_mult=0.5), good, RES)
    assert read_pt2(good)[1]["format"] == "mobilenet-pt2"
    pickled = io.BytesIO()
    torch.save(_Boom(), pickled)

    def pickled_sample(name, data):
        return pickled.getvalue() if name == "data/sample_inputs/model.pt" else data

    def pickled_weights(name, data):
        if name != "data/weights/model_weights_config.json":
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    def foreign_target(name, data):
        if name != "models/model.json":
            return data
        return data.replace(b"torch.ops.aten.hardswish.default", b"torch.os.system")

    def evil_expression(name, data):
        if name != "models/model.json":
            return data
        text = data.decode()
        return text.replace("Symbol('s", "__import__('os').getcwd() + Symbol('s", 1).encode()

    def extra_record(name, data):
        return data

    cases = {
        "sample inputs are not plain tensors": pickled_sample,
        "holds pickled weights": pickled_weights,
        "only ATen operators load": foreign_target,
        "unexpected shape expression": evil_expression,
    }
    for message, change in cases.items():
        bad = tmp_path / f"{change.__name__}.pt2"
        _rewrite(good, bad, change)
        with pytest.raises(MobileNetError, match=message):
            read_pt2(bad)
    library = tmp_path / "aoti.pt2"
    _rewrite(good, library, extra_record)
    with zipfile.ZipFile(library, "a") as z:
        z.writestr("archive/data/aotinductor/model/model.so", b"\x7fELF")
    with pytest.raises(MobileNetError, match=r"holds 'data/aotinductor/model/model\.so'"):
        read_pt2(library)
    assert "unpickled!" not in capsys.readouterr().out


def test_a_pt2_refuses_images_of_another_size(tmp_path):
    path = tmp_path / "m.pt2"
    export_pt2(_model("mobilenet_v3_small", width_mult=0.5), path, RES)
    trained = load_trained(str(path))
    with pytest.raises(MobileNetError, match=f"takes \\(batch, 3, {RES}, {RES}\\)"):
        trained.model(torch.randn(1, 3, RES + 8, RES + 8))
    with pytest.raises(MobileNetError, match=f"takes {RES}x{RES} images, not 64"):
        load_trained(str(path), resolution=64)
    with pytest.raises(MobileNetError, match="holds mobilenet_v3_small, not mobilenet_v2"):
        load_trained(str(path), "mobilenet_v2")


def test_pt2_export_keeps_the_export_cli_rules(tmp_path, capsys):
    weights = save_weights(
        _model("mobilenet_v3_small", num_classes=3),
        tmp_path / "w.safetensors",
        {"classes": '["a","b","c"]'},
    )
    out = tmp_path / "m.pt2"
    args = ["export", "--model", "mobilenet_v3_small", "--weights", str(weights)]
    assert main([*args, "--format", "pt2", "--opset", "17", "--out", str(out)]) == 2
    assert "--opset applies to --format onnx" in capsys.readouterr().err
    assert main([*args, "--format", "pt2", "--resolution", str(RES), "--out", str(out)]) == 0
    assert load_trained(str(out)).classes == ["a", "b", "c"]
    again = ["export", "--model", "mobilenet_v3_small", "--weights", str(out)]
    assert main([*again, "--format", "pt2", "--out", str(tmp_path / "again.pt2")]) == 2
    assert "already exported" in capsys.readouterr().err
