"""MobileNetV4 (Qin et al., 2024) quantized: ONNX int8 (QDQ) from the CLI on a V4 trained
briefly on the built-in digits, with the V4 recipe scaled down (``mobilenet_v4-demo``)."""

import collections
import json

import pytest

from mobilenet.cli import main

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

QUICK = ["--resolution", "32", "--batch-size", "64", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def v4_digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("v4int8") / "run"
    args = ["train", "--data", "digits", "--model", "mobilenet_v4_conv_small"]
    args += ["--width-mult", "0.5", "--recipe", "mobilenet_v4-demo", "--epochs", "4"]
    assert main([*args, "--out", str(out), *QUICK]) == 0
    return str(out / "best.safetensors")


def _eval(weights: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["eval", "--weights", weights, "--data", "digits", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_quantize_v4_to_onnx_int8(v4_digits, tmp_path, capsys):
    out = tmp_path / "v4-int8.onnx"
    args = ["quantize", "--weights", v4_digits, "--data", "digits", "--out", str(out)]
    assert main([*args, "--calibration-images", "128"]) == 0
    assert "int8" in capsys.readouterr().out
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    quantized, reference = _eval(str(out), capsys), _eval(v4_digits, capsys)
    assert quantized["images"] == reference["images"] == 297
    # A briefly trained model at 32x32: a working int8 model, not an accuracy target
    # (the MNIST model of benchmarks/v4_mnist.py keeps its 98.1% in int8: docs/mobilenet_v4.md).
    assert reference["top1"] > 70 and quantized["top1"] >= reference["top1"] - 8
