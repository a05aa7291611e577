"""Integer-only int8 ONNX: the graph rewrites keep the float function, and ONNX Runtime
runs MobileNetV3's h-swish, h-sigmoid and squeeze-excite in integer kernels."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from mobilenet import create_model
from mobilenet.bench import timing_model
from mobilenet.export import export_onnx
from mobilenet.export.qdq import (
    MARK,
    SHIFT_MARK,
    fold_marked_scales,
    fold_marked_shifts,
    integer_friendly,
    module_nodes,
)
from mobilenet.export.qdq_pad import pad_depthwise
from mobilenet.export.quantize import float_modules, quantize_file

from .helpers import randomize_bn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
shape_inference = pytest.importorskip("onnxruntime.quantization.shape_inference")

RES = 64
# What ONNX Runtime may run an integer-only model with: integer kernels, the input's
# quantization and the logits' dequantization, layout ops, and h-sigmoid's Clip of
# integers (fold_marked_shifts).
INTEGER_OPS = {
    "QLinearConv", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QGemm",
    "QuantizeLinear", "DequantizeLinear", "Flatten", "Transpose", "Clip",
}  # fmt: skip


def _float_model(tmp_path, name: str, width: float):
    model = randomize_bn(create_model(name, num_classes=10, width_mult=width)).eval()
    path = tmp_path / "fp32.onnx"
    export_onnx(model, path, RES)
    pre = tmp_path / "pre.onnx"
    shape_inference.quant_pre_process(str(path), str(pre))
    return path, pre


def _run(model_or_path, x: np.ndarray) -> np.ndarray:
    source = model_or_path
    if not isinstance(source, str):
        source = source.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x})[0]


def _cosine(float_path, int8_path, x: np.ndarray) -> np.ndarray:
    """The cosine between the float and the int8 model's logits, image by image."""
    expected, got = _run(str(float_path), x), _run(str(int8_path), x)
    return (expected * got).sum(1) / np.linalg.norm(expected, axis=1) / np.linalg.norm(got, axis=1)


def _optimized_graph(int8, tmp_path):
    """The graph ONNX Runtime runs for ``int8`` (its extended optimisations applied)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_rewrites_compute_the_same_float_function(name, tmp_path):
    _, pre = _float_model(tmp_path, name, 0.5)  # width 0.5: depthwise channels of 8s
    model = onnx.load(str(pre))
    before = collections.Counter(n.op_type for n in model.graph.node)
    assert before["HardSigmoid"] > 0 and before["ReduceMean"] > 0

    integer_friendly(model)
    padded = pad_depthwise(model)
    onnx.checker.check_model(model)

    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["HardSigmoid"] == ops["ReduceMean"] == 0
    assert padded > 0
    for node in model.graph.node:
        group = [a.i for a in node.attribute if a.name == "group"]
        if node.op_type == "Conv" and group and group[0] > 1:
            assert group[0] % 16 == 0
    x = np.random.default_rng(0).standard_normal((3, 3, RES, RES)).astype(np.float32)
    expected = _run(str(pre), x)
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5 * np.abs(expected).max())


def test_shared_initializers_are_copied_not_changed_for_everyone(tmp_path):
    """Exporters share equal constants (zero biases); folding one conv's gate must not
    change another conv that uses the same initializer."""
    _, pre = _float_model(tmp_path, "mobilenet_v3_small", 1.0)
    model = onnx.load(str(pre))
    inits = {t.name: t for t in model.graph.initializer}
    groups = collections.defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in inits:
            size = onnx.numpy_helper.to_array(inits[node.input[2]]).size
            groups[size].append(node)
    gated = {size: convs for size, convs in groups.items() if any("fc2" in n.name for n in convs)}
    size, convs = max(gated.items(), key=lambda kv: len(kv[1]))  # an SE gate among others
    assert len(convs) > 1
    zero = onnx.numpy_helper.from_array(np.zeros(size, np.float32), "shared_zero_bias")
    model.graph.initializer.append(zero)
    for node in convs:
        node.input[2] = "shared_zero_bias"
    x = np.random.default_rng(0).standard_normal((2, 3, RES, RES)).astype(np.float32)
    expected = _run(model, x)
    integer_friendly(model)
    pad_depthwise(model)
    np.testing.assert_allclose(_run(model, x), expected, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "mobilenet_v2"])
def test_int8_graph_is_integer_only_and_close_to_float(name, tmp_path):
    path, _ = _float_model(tmp_path, name, 0.75)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((4, 3, RES, RES)).astype(np.float32) for _ in range(4)]
    int8 = tmp_path / "int8.onnx"
    quantize_file(path, int8, iter({"images": x} for x in calibration))

    assert not any(n.name.startswith(MARK) for n in onnx.load(str(int8)).graph.node)
    ops = collections.Counter(n.op_type for n in _optimized_graph(int8, tmp_path).node)
    assert set(ops) <= INTEGER_OPS, set(ops) - INTEGER_OPS
    assert ops["QuantizeLinear"] == ops["DequantizeLinear"] == 1  # the input, the logits

    assert _cosine(path, int8, calibration[0]).min() > 0.98


def _quantized_without(monkeypatch, path, out, fold: str) -> np.ndarray:
    """Quantize ``path`` into ``out`` as ``quantize_file`` does but without the
    ``export.quantize`` step named ``fold``; returns a batch of the calibration images."""
    import mobilenet.export.quantize as quantize

    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((2, 3, RES, RES)).astype(np.float32) for _ in range(2)]
    with monkeypatch.context() as patched:
        patched.setattr(quantize, fold, lambda model: 0)
        quantize_file(path, out, iter({"images": x} for x in batches))
    return batches[0]


def test_folding_a_marked_scale_reads_the_same_integers(tmp_path, monkeypatch):
    """Without the fold, the marked Mul runs as a requantization; with it, the integers
    before it are read with the scale multiplied: the outputs agree to int8 rounding."""
    path, _ = _float_model(tmp_path, "mobilenet_v3_small", 1.0)
    int8 = tmp_path / "int8.onnx"
    unfolded = tmp_path / "unfolded.onnx"
    x = _quantized_without(monkeypatch, path, unfolded, "fold_marked_scales")
    model = onnx.load(str(unfolded))
    marked = sum(n.name.startswith(MARK) for n in model.graph.node)
    assert marked > 0 and fold_marked_scales(model) == marked
    onnx.save(model, str(int8))
    reference, folded, plain = _run(str(path), x), _run(str(int8), x), _run(str(unfolded), x)
    scale = np.abs(reference).max()
    assert np.abs(folded - reference).max() <= max(
        2 * np.abs(plain - reference).max(), 0.05 * scale
    )


def test_module_nodes_are_the_modules_own_named_and_unnamed(tmp_path):
    _, pre = _float_model(tmp_path, "mobilenet_v3_large", 1.0)
    model = onnx.load(str(pre))
    names = module_nodes(model, ["features.0", "features.1"])
    nodes = {n.name: n for n in model.graph.node}
    assert all(nodes)  # every node is named now, the exporter's unnamed h-swish parts too
    ops = collections.Counter(nodes[name].op_type for name in names)
    # stem conv + h-swish (unnamed HardSigmoid and Mul); dw conv, ReLU, project conv, add
    assert ops == {"Conv": 3, "HardSigmoid": 1, "Mul": 1, "Relu": 1, "Add": 1}, ops
    assert not module_nodes(model, ["features.1.nothing"])
    se = module_nodes(model, ["features.4.se"])  # a module inside a block
    assert {nodes[name].op_type for name in se} >= {"Conv", "Mul"}
    assert all("/features.4/se/" in name or name.startswith("node_") for name in se), se
    assert not any("features.2/" in n or "features.10" in n for n in names)
    assert float_modules("mobilenet_v3_small") == ("features.0", "features.1")
    assert float_modules("mobilenet_v1") == float_modules("mobilenet_v4_conv_medium") == ()


def test_a_float_head_stays_float_and_the_rest_integer(tmp_path):
    """MobileNetV3's stem and first block left in float32: ONNX Runtime runs them as float
    convs, everything after them in integer kernels, and the logits stay close."""
    path, _ = _float_model(tmp_path, "mobilenet_v3_small", 0.75)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((4, 3, RES, RES)).astype(np.float32) for _ in range(4)]
    int8 = tmp_path / "int8.onnx"
    quantize_file(
        path, int8, iter({"images": x} for x in calibration), ("features.0", "features.1")
    )

    graph = _optimized_graph(int8, tmp_path)
    ops = collections.Counter(n.op_type for n in graph.node)
    float_convs = [n.name for n in graph.node if n.op_type in ("Conv", "FusedConv")]
    # stem; first block: depthwise, squeeze-excite's two, project
    assert len(float_convs) == 5, float_convs
    assert all("features.0/" in n or "features.1/" in n for n in float_convs)
    assert ops["QLinearConv"] > 20 and ops["QuantizeLinear"] == 1  # after the first block
    assert not any(n.op_type == "QLinearConv" and "features.1/" in n.name for n in graph.node)

    assert _cosine(path, int8, calibration[0]).min() > 0.98


def test_float_nodes_get_constants_of_their_own(tmp_path):
    """An untrained model's zero biases are one shared constant; a float conv sharing it
    kept ONNX Runtime from its fast float kernels (V2's float head ran 1.3x slower)."""
    path = tmp_path / "fp32.onnx"
    export_onnx(create_model("mobilenet_v2", num_classes=10, width_mult=0.5).eval(), path, RES)
    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}

    def shared(nodes) -> set[str]:
        users = collections.Counter(i for n in model.graph.node for i in n.input)
        return {i for n in nodes for i in n.input if i in initializers and users[i] > 1}

    head = [n for n in model.graph.node if "features.0/" in n.name or "features.1/" in n.name]
    assert shared(head)  # the exporter shares the zero biases
    names = module_nodes(model, ["features.0", "features.1"])
    initializers = {t.name for t in model.graph.initializer}
    assert not shared([n for n in model.graph.node if n.name in names])
    onnx.checker.check_model(model)


def _quantized_unshifted(tmp_path, monkeypatch, model) -> tuple:
    """A float file of ``model``, its int8 file before ``fold_marked_shifts``, and a batch
    of the calibration images."""
    path, unshifted = tmp_path / "fp32.onnx", tmp_path / "unshifted.onnx"
    export_onnx(model, path, RES)
    x = _quantized_without(monkeypatch, path, unshifted, "fold_marked_shifts")
    return path, unshifted, x


def test_folding_a_marked_shift_clips_the_same_integers(tmp_path, monkeypatch):
    """h-swish's integer Add goes: ``x``'s grid puts -3 at integer 0 and 3 a whole number
    of steps, so ``Clip(x + 3, 0, 6)`` is a Clip of its integers; the logits stay as close
    to float as without the fold, and ONNX Runtime runs one QLinearAdd less per h-swish."""
    model = timing_model("mobilenet_v3_small", 0.75, RES)  # unit-scale activations
    path, unshifted, x = _quantized_unshifted(tmp_path, monkeypatch, model)
    folded_path = tmp_path / "folded.onnx"
    model = onnx.load(str(unshifted))
    marked = sum(n.name.startswith(SHIFT_MARK) for n in model.graph.node)
    folded = fold_marked_shifts(model)
    assert marked > 5 and folded == marked
    onnx.checker.check_model(model)
    onnx.save(model, str(folded_path))

    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert 0 < len(clips) <= folded  # none where x never reaches 3: nothing to clip
    for clip in clips:
        quantize_x = producer[clip.input[0]]
        assert quantize_x.op_type == "QuantizeLinear"
        steps = int(arrays[quantize_x.input[2]])  # the zero point: -3 is integer 0
        assert steps >= 1 and arrays[quantize_x.input[1]] * steps == pytest.approx(3, rel=1e-6)
        assert int(arrays[clip.input[1]]) == 0 and int(arrays[clip.input[2]]) == 2 * steps

    reference, plain = _run(str(path), x), _run(str(unshifted), x)
    got = _run(str(folded_path), x)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= max(2 * np.abs(plain - reference).max(), 0.05 * scale)
    adds = [
        collections.Counter(n.op_type for n in _optimized_graph(p, tmp_path).node)["QLinearAdd"]
        for p in (unshifted, folded_path)
    ]
    assert adds[0] - adds[1] == folded


def test_a_shift_stays_where_the_grid_would_coarsen(tmp_path, monkeypatch):
    """An untrained network's activations shrink layer after layer: putting -3 on their
    grid would make its step thousands of times coarser, so the integer Add stays. Only
    the stem's, which sees the image's unit-scale values, is folded."""
    model = create_model("mobilenet_v3_small", width_mult=0.75).eval()
    _, unshifted, _ = _quantized_unshifted(tmp_path, monkeypatch, model)
    model = onnx.load(str(unshifted))

    def marked() -> list[str]:
        return [n.input[0] for n in model.graph.node if n.name.startswith(SHIFT_MARK)]

    before = marked()
    assert len(before) > 5 and fold_marked_shifts(model) == 1
    (stem,) = set(before) - set(marked())
    assert stem.startswith("/features/features.0/")
