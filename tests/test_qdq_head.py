"""The int8 graph's classifier head as 1x1 convolutions: the same function, the same
outputs, and ONNX Runtime running it on its int8 convolution kernels."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from mobilenet import create_model
from mobilenet.export import export_onnx
from mobilenet.export.qdq_head import head_as_convs
from mobilenet.export.quantize import quantize_file

from .helpers import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
shape_inference = pytest.importorskip("onnxruntime.quantization.shape_inference")

RES = 64


def _pre(tmp_path, name: str):
    model = randomize_bn(create_model(name, num_classes=10, width_mult=0.5)).eval()
    path, pre = tmp_path / "fp32.onnx", tmp_path / "pre.onnx"
    export_onnx(model, path, RES)
    shape_inference.quant_pre_process(str(path), str(pre))
    return path, onnx.load(str(pre))


def _run(model, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize(
    ("name", "gemms"), [("mobilenet_v3_small", 2), ("mobilenet_v2", 1), ("mobilenet_v1", 1)]
)
def test_head_as_convs_computes_the_same_logits(name, gemms, tmp_path):
    _, model = _pre(tmp_path, name)
    x = np.random.default_rng(0).standard_normal((3, 3, RES, RES)).astype(np.float32)
    expected = _run(model, x)
    weights = sum(t.dims[0] * t.dims[1] for t in model.graph.initializer if len(t.dims) == 2)

    assert head_as_convs(model) == gemms
    onnx.checker.check_model(model, full_check=True)
    ops = _ops(model)
    assert ops["Gemm"] == 0 and ops["Flatten"] == 1
    assert [o.name for o in model.graph.output] == ["logits"]
    got = _run(model, x)
    assert got.shape == expected.shape == (3, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max())
    # the Gemms' 2-D weights left the file with them
    assert not any(len(t.dims) == 2 for t in model.graph.initializer) and weights > 0


def test_a_head_left_in_float_and_a_gemm_of_no_pool_stay(tmp_path):
    _, model = _pre(tmp_path, "mobilenet_v3_small")
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    assert head_as_convs(model, keep=set(gemms)) == 0
    assert _ops(model)["Gemm"] == 2

    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.ones((4, 6), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w"], ["y"], transB=1),
        ],
        "no_pool",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, 1, 1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    plain = helper.make_model(graph)
    assert head_as_convs(plain) == 0
    assert _ops(plain) == {"Flatten": 1, "Gemm": 1}


def test_quantized_head_runs_as_integer_convolutions(tmp_path):
    path, _ = _pre(tmp_path, "mobilenet_v3_small")
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((2, 3, RES, RES)).astype(np.float32) for _ in range(2)]
    int8 = tmp_path / "int8.onnx"
    quantize_file(path, int8, iter({"images": x} for x in calibration))

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = _ops(onnx.load(options.optimized_model_filepath))
    assert ops["QGemm"] == ops["Gemm"] == 0
    expected, got = _run(str(path), calibration[0]), _run(str(int8), calibration[0])
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1)
    cosine = (expected * got).sum(1) / norms
    assert cosine.min() > 0.98
