"""int8 PyTorch models: PTQ and QAT from the CLI, exact save/reload, bad files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mobilenet import create_model
from mobilenet.card import ModelCard
from mobilenet.classification.predict import load_trained
from mobilenet.cli import main
from mobilenet.errors import CheckpointError
from mobilenet.export.int8 import Int8Model, quantize_model
from mobilenet.export.int8_file import int8_from_checkpoint, save_int8
from mobilenet.weights import sealed_safetensors

from .helpers import needs_x86_int8, paper_models, randomize_bn

pytestmark = needs_x86_int8

QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "64"]
QUICK += ["--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("int8") / "run"
    assert main(["train", "--data", "digits", "--epochs", "4", "--out", str(out), *QUICK]) == 0
    return str(out / "best.safetensors")


def _eval(weights: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--weights", weights, "--data", "digits", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_quantize_cli_torch_int8(method, digits_weights, tmp_path, capsys):
    out = tmp_path / "int8.safetensors"
    args = ["quantize", "--weights", digits_weights, "--data", "digits", "--out", str(out)]
    args += ["--method", method]
    args += ["--calibration-images", "128"] if method == "ptq" else ["--epochs", "1"]
    assert main(args) == 0
    assert "int8" in capsys.readouterr().out
    written = sorted(p.name for p in tmp_path.iterdir())
    if method == "ptq":
        assert written == ["int8.safetensors"]
    else:  # QAT is a training run, in its folder: the file is its best epoch, converted
        assert written == ["int8.qat", "int8.safetensors"]
        run = tmp_path / "int8.qat"
        assert {"metrics.csv", "last.pt", "best.safetensors"} <= {p.name for p in run.iterdir()}
        assert (run / "best.safetensors").read_bytes() == out.read_bytes()
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    dtypes = {t.dtype for t in load_file(str(out)).values()}
    scheme = json.loads(metadata["quantization"])
    assert metadata["precision"] == "int8" and scheme["method"] == method
    assert torch.int8 in dtypes and torch.float32 in dtypes  # int8 weights, float scales

    quantized, reference = _eval(str(out), capsys), _eval(digits_weights, capsys)
    assert quantized["images"] == reference["images"] == 297
    # A briefly trained digits model at 32x32: this checks a working int8 model; the
    # accuracy targets are measured on the MNIST models (benchmarks/int8_mnist.json).
    assert reference["top1"] > 80 and quantized["top1"] >= reference["top1"] - 8

    first, second = load_trained(str(out)), load_trained(str(out))
    assert isinstance(first.model, Int8Model) and first.resolution == 32
    assert first.classes == [str(i) for i in range(10)]
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(first.model(x), second.model(x))


def test_predict_with_an_int8_model(digits_weights, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "int8.safetensors"
    args = ["quantize", "--weights", digits_weights, "--data", "digits", "--out", str(out)]
    assert main([*args, "--calibration-images", "64"]) == 0
    image = tmp_path / "blank.png"
    Image.new("L", (32, 32)).save(image)
    capsys.readouterr()
    assert main(["predict", "--weights", str(out), str(image), "--json", "--top", "3"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert len(top) == 3 and abs(sum(t["probability"] for t in top) - 1) < 1.0


INVERTED_RESIDUAL = [n for n in paper_models() if not n.startswith("mobilenet_v1")]


@pytest.mark.parametrize("name", [*INVERTED_RESIDUAL, "mobilenet_v1"])
def test_saved_and_reloaded_int8_models_are_identical(name, tmp_path):
    """The reloaded int8 network (SE, h-swish, residual adds included) is bit-identical."""
    torch.manual_seed(0)
    model = create_model(name, width_mult=0.5, num_classes=7).eval()
    randomize_bn(model)
    calibration = [torch.randn(8, 3, 64, 64) for _ in range(2)]
    int8 = quantize_model(model, calibration, resolution=64)
    x = torch.randn(3, 3, 64, 64)
    expected, reference = int8(x), model(x)
    # Quantized, it still computes the float network's function.
    assert (expected - reference).abs().max() < 0.25 * reference.abs().max()
    path = save_int8(int8, tmp_path / "m.safetensors", _card(7, 64))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    reloaded, _ = int8_from_checkpoint(load_file(str(path)), metadata, str(path))
    assert torch.equal(reloaded(x), expected)


def test_damaged_int8_files_fail_cleanly(digits_weights, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", width_mult=0.5, num_classes=10).eval()
    int8 = quantize_model(model, [torch.randn(4, 3, 32, 32)], resolution=32)
    path = save_int8(int8, tmp_path / "m.safetensors", _card(10, 32))
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())

    # Another architecture named in the metadata: the tensors do not fit it.
    wrong = tmp_path / "wrong.safetensors"
    config = json.loads(metadata["config"])
    wrong_config = {**metadata, "config": json.dumps({**config, "width_mult": 1})}
    wrong.write_bytes(sealed_safetensors(tensors, wrong_config))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_trained(str(wrong))
    # A tensor missing.
    missing = tmp_path / "missing.safetensors"
    kept = {k: v for k, v in tensors.items() if "classifier" not in k}
    missing.write_bytes(sealed_safetensors(kept, metadata))
    assert main(["eval", "--weights", str(missing), "--data", "digits"]) == 2
    assert "do not fit" in capsys.readouterr().err
    # A truncated file.
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    assert main(["eval", "--weights", str(truncated), "--data", "digits"]) == 2
    assert "not a readable" in capsys.readouterr().err


def test_quantize_bad_requests_write_nothing(digits_weights, tmp_path, capsys):
    base = ["quantize", "--weights", digits_weights, "--data", "digits"]
    assert main([*base, "--method", "qat", "--out", str(tmp_path / "q.onnx")]) == 2
    assert "use --format torch" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # refused by the argument parser
        main([*base, "--lr", "-1", "--method", "qat", "--out", str(tmp_path / "q.st")])
    assert exit_info.value.code == 2
    assert "argument --lr: must be > 0" in capsys.readouterr().err
    out = tmp_path / "q.safetensors"
    assert main([*base[:-1], str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "data not found" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _card(classes: int, resolution: int) -> ModelCard:
    return ModelCard(classes=tuple(map(str, range(classes))), input_size=(resolution, resolution))
