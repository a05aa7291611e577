"""LiteRT (.tflite) through the commands: export and quantize write it, eval and predict
run it on its own engine, predict --engine litert exports float weights once, bench times
it; damaged files and wrong combinations are one line. Skipped without the ``litert``
extra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from mobilenet import save_weights
from mobilenet.classification.predict import load_trained
from mobilenet.cli import main
from mobilenet.formats.litert import TfliteModel

from .helpers import cli_json, noise_image, random_model

RES = 64
CLASSES = list("abcdefghij")


def _weights(folder: Path) -> str:
    model = random_model("mobilenet_v3_small", RES)
    metadata = {"classes": json.dumps(CLASSES), "resolution": str(RES)}
    return str(save_weights(model, folder / "w.safetensors", metadata))


def test_export_then_eval_and_predict_of_the_file(tmp_path, capsys):
    weights, image = _weights(tmp_path), noise_image(tmp_path)
    out = tmp_path / "m.tflite"
    args = ["export", "--model", "mobilenet_v3_small", "--weights", weights]
    assert main([*args, "--format", "tflite", "--out", str(out)]) == 0
    assert "LiteRT vs PyTorch" in capsys.readouterr().out

    trained = load_trained(str(out))
    assert isinstance(trained.model, TfliteModel) and trained.model.precision == "float32"
    assert trained.classes == CLASSES and trained.resolution == RES
    reference = load_trained(weights)
    x = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.model.eval()(x)
    atol = 1e-4 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(trained.model(x), expected, atol=atol, rtol=0)

    float_eval = cli_json(capsys, "eval", "--weights", weights, "--data", "digits")
    file_eval = cli_json(capsys, "eval", "--weights", str(out), "--data", "digits")
    assert float_eval["images"] == file_eval["images"] == 297
    assert float_eval["top1"] == file_eval["top1"]
    (result,) = cli_json(capsys, "predict", "--weights", str(out), str(image))
    assert result["engine"] == "litert"
    assert main(["predict", "--weights", str(out), str(image), "--engine", "onnxruntime"]) == 2
    assert "runs on its own engine, litert" in capsys.readouterr().err


def test_predict_engine_litert_exports_once(tmp_path, capsys, monkeypatch):
    from mobilenet.export import litert

    weights, image = _weights(tmp_path), noise_image(tmp_path)
    common = ["predict", "--weights", weights, str(image)]
    (eager,) = cli_json(capsys, *common, "--engine", "eager")
    (first,) = cli_json(capsys, *common, "--engine", "litert")
    (cached,) = (Path(os.environ["MOBILENET_HOME"]) / "tflite").iterdir()
    monkeypatch.setattr(litert, "export_tflite", None)  # the second run must not export
    (second,) = cli_json(capsys, *common, "--engine", "litert")
    assert first["engine"] == second["engine"] == "litert"
    for result in (first, second):
        assert [t["class"] for t in result["top"]] == [t["class"] for t in eager["top"]]
        for ours, theirs in zip(result["top"], eager["top"], strict=True):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
    assert cached.suffix == ".tflite"


def test_quantize_to_tflite_and_evaluate(tmp_path, capsys):
    weights = _weights(tmp_path)
    out = tmp_path / "int8.tflite"
    args = ["quantize", "--weights", weights, "--data", "digits", "--out", str(out)]
    assert main([*args, "--calibration-images", "32"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "full-integer LiteRT model, batch 1 (larger batches run image by image), " in said
    assert "calibrated on 32 images of digits" in said
    trained = load_trained(str(out))
    assert isinstance(trained.model, TfliteModel) and trained.model.precision == "int8"
    metrics = cli_json(capsys, "eval", "--weights", str(out), "--data", "digits")
    assert metrics["images"] == 297 and 0 <= metrics["top1"] <= 100
    (result,) = cli_json(capsys, "predict", "--weights", str(out), str(noise_image(tmp_path)))
    assert result["engine"] == "litert-int8"


def test_wrong_combinations_and_damaged_files_are_one_line(tmp_path, capsys):
    weights = _weights(tmp_path)
    base = ["quantize", "--weights", weights, "--data", "digits"]
    assert main([*base, "--format", "tflite", "--out", str(tmp_path / "q.onnx")]) == 2
    assert "--format tflite writes a .tflite file" in capsys.readouterr().err
    assert (
        main([*base, "--format", "tflite", "--method", "qat", "--out", str(tmp_path / "q.tflite")])
        == 2
    )
    assert "use --format torch" in capsys.readouterr().err
    assert not list(tmp_path.glob("q.*"))

    damaged = tmp_path / "bad.tflite"
    damaged.write_bytes(b"\x00" * 64)
    for command in (["eval", "--data", "digits"], ["predict", str(noise_image(tmp_path))]):
        assert main([command[0], "--weights", str(damaged), *command[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bad.tflite" in err and "Traceback" not in err
