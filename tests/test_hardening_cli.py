"""The command line on inconsistent or poisoned input: non-finite outputs are an error
naming the file, metadata that contradicts its program is refused at load, flags that
agree with a file are accepted and only contradictions refused, and what used to be a
traceback is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobilenet import create_model, save_weights
from mobilenet.cli import main

from .helpers import noise_image, random_model

RES = 32
CLASSES = list("abcdefghij")
SEG = "lraspp_mobilenet_v3_small"


def _error(capsys, args: list[str]) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _classifier(folder: Path, name: str = "w.safetensors", **metadata: str) -> Path:
    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    meta = {"classes": json.dumps(CLASSES), "resolution": str(RES), **metadata}
    return save_weights(model, folder / name, meta)


def _overflowing(folder: Path) -> Path:
    """A classifier whose weights are all finite (so they load) but whose logits overflow
    to infinity and NaN."""
    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    with torch.no_grad():
        model.classifier.weight.fill_(3e38)
    meta = {"classes": json.dumps(CLASSES), "resolution": str(RES)}
    return save_weights(model, folder / "nan.safetensors", meta)


def _image_folder(folder: Path) -> Path:
    """Two classes of the ten, one noise image each."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in "ab":
        (folder / "data" / c).mkdir(parents=True)
        pixels = torch.randint(0, 255, (40, 40, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(folder / "data" / c / "0.png")
    return folder / "data"


def _segmentation_folder(folder: Path) -> str:
    """Two noise images with masks of classes 0 to 2 (``images/`` + ``masks/``)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = folder / "segdata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("bg\nx\ny\n")
    for i in range(2):
        pixels = torch.randint(0, 255, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        mask = torch.randint(0, 3, (40, 48), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{i}.png")
    return str(root)


def _segmenter(folder: Path, scale: float | None = None) -> Path:
    model = create_model(SEG, width_mult=0.25, num_classes=3)
    if scale is not None:
        with torch.no_grad():
            for p in model.head.parameters():
                p.fill_(scale)
    meta = {"task": "segmentation", "classes": json.dumps(["bg", "x", "y"]), "image_size": "64x64"}
    return save_weights(model, folder / "seg.safetensors", meta)


def _export_onnx(model, path: Path, res: int, **metadata: str) -> Path:
    from mobilenet.export.onnx import export_onnx

    export_onnx(model, path, res, metadata=metadata)
    return path


# ----------------------------------------------------------------- non-finite outputs


def test_predict_of_a_model_that_outputs_nan_is_one_line(tmp_path, capsys):
    weights, image = _overflowing(tmp_path), noise_image(tmp_path)
    line = _error(capsys, ["predict", str(image), "--weights", str(weights), "--engine", "eager"])
    assert f"{weights}: the model outputs NaN or infinite values" in line


def test_eval_of_a_model_that_outputs_nan_is_one_line(tmp_path, capsys):
    weights, data = _overflowing(tmp_path), _image_folder(tmp_path)
    line = _error(capsys, ["eval", "--weights", str(weights), "--data", str(data)])
    assert f"{weights}: the model outputs NaN or infinite values" in line


def test_eval_and_predict_of_an_onnx_file_that_outputs_nan(tmp_path, capsys):
    """A file whose classifier bias is infinite (written as the exporter would, its digest
    renewed): the runtime's NaN is refused as the PyTorch model's is."""
    onnx = pytest.importorskip("onnx")
    from mobilenet.integrity import DIGEST_KEY, seal, sealed_metadata

    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    path = _export_onnx(model, tmp_path / "m.onnx", RES, classes=json.dumps(CLASSES))
    proto = onnx.load_model_from_string(path.read_bytes())
    biases = [i for i in proto.graph.initializer if tuple(i.dims) == (10,)]
    assert biases  # the classifier's
    for init in biases:
        values = onnx.numpy_helper.to_array(init).copy()
        values[:] = float("inf")
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    meta = {p.key: p.value for p in proto.metadata_props if p.key != DIGEST_KEY}
    del proto.metadata_props[:]
    for key, value in sealed_metadata(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(seal(proto.SerializeToString()))

    data, image = _image_folder(tmp_path), noise_image(tmp_path)
    line = _error(capsys, ["eval", "--weights", str(path), "--data", str(data)])
    assert f"{path}: the model outputs NaN or infinite values" in line
    line = _error(capsys, ["predict", str(image), "--weights", str(path)])
    assert f"{path}: the model outputs NaN or infinite values" in line


def test_segmentation_eval_and_predict_of_a_model_that_outputs_nan(tmp_path, capsys):
    weights, image = _segmenter(tmp_path, scale=3e38), noise_image(tmp_path)
    data = _segmentation_folder(tmp_path)
    line = _error(capsys, ["eval", "--weights", str(weights), "--data", data])
    assert f"{weights}: the model outputs NaN or infinite values" in line
    out = tmp_path / "masks"
    line = _error(capsys, ["predict", str(image), "--weights", str(weights), "--out", str(out)])
    assert f"{weights}: the model outputs NaN or infinite values" in line
    assert not out.exists() or not any(out.iterdir())  # no mask of NaN written


def _nan_detector(folder: Path) -> Path:
    model = create_model("ssdlite_mobilenet_v3_small", width_mult=0.25, num_classes=3,
                         image_size=64)  # fmt: skip
    with torch.no_grad():
        for p in model.classification.parameters():
            p.fill_(3e38)
    categories = [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    meta = {"task": "detection", "categories": json.dumps(categories)}
    return save_weights(model, folder / "det.safetensors", meta)


def test_detection_predict_of_a_model_that_outputs_nan(tmp_path, capsys):
    weights, image = _nan_detector(tmp_path), noise_image(tmp_path)
    line = _error(capsys, ["predict", str(image), "--weights", str(weights)])
    assert f"{weights}: the model outputs NaN or infinite values" in line


def test_detection_eval_of_a_model_that_outputs_nan(tmp_path, capsys):
    """NaN scores would leave no box above the threshold: a mAP of 0 that looks measured."""
    pytest.importorskip("pycocotools")
    from PIL import Image

    weights = _nan_detector(tmp_path)
    root = tmp_path / "coco"
    root.mkdir()
    Image.new("RGB", (64, 64), (20, 120, 150)).save(root / "1.png")
    coco = {
        "images": [{"id": 1, "file_name": "1.png", "width": 64, "height": 64}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [4, 4, 20, 24], "category_id": 1}],
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    line = _error(capsys, ["eval", "--weights", str(weights), "--data", str(root)])
    assert f"{weights}: the model outputs NaN or infinite values" in line


def test_a_finite_model_still_evaluates_and_training_evaluation_is_unchanged(tmp_path, capsys):
    from torch.utils.data import DataLoader, TensorDataset

    from mobilenet.train.distributed import Distributed
    from mobilenet.train.evaluate import evaluate

    weights, data = _classifier(tmp_path), _image_folder(tmp_path)
    assert main(["eval", "--weights", str(weights), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    # Without a source (training's own evaluation) NaN logits are scores, not an error.
    nan = torch.nn.Linear(3, 2)
    with torch.no_grad():
        nan.bias.fill_(float("nan"))
    loader = DataLoader(TensorDataset(torch.randn(2, 3), torch.tensor([0, 1])), batch_size=2)
    dist = Distributed(0, 1, 0, torch.device("cpu"))
    assert evaluate(nan, loader, dist, channels_last=False)["top1"] >= 0


# ------------------------------------------------- metadata that contradicts the program


def test_classes_of_another_count_are_refused_not_renumbered(tmp_path, capsys):
    weights = _classifier(tmp_path, classes=json.dumps(["a", "b", "c"]))
    image = noise_image(tmp_path)
    line = _error(capsys, ["predict", str(image), "--weights", str(weights)])
    assert f"{weights}: metadata 'classes' lists 3 classes; the model has 10" in line


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"classes": json.dumps(["a", "b", "c"])},
         "metadata 'classes' lists 3 classes; the model has 10"),
        ({"num_classes": 1000},
         "metadata 'config' says 1000 classes; the program outputs 10 logits"),
        ({"resolution": "64"}, "metadata says 64x64 images; the graph takes"),
    ],
)  # fmt: skip
def test_onnx_metadata_that_contradicts_the_graph_is_refused(tmp_path, capsys, metadata, message):
    pytest.importorskip("onnxruntime")
    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    extra = {"classes": json.dumps(CLASSES)}
    if "num_classes" in metadata:
        extra["config"] = json.dumps({**model.config.to_dict(), **metadata})
    else:
        extra.update(metadata)
    path = _export_onnx(model, tmp_path / "m.onnx", RES, **extra)
    data = _image_folder(tmp_path)
    line = _error(capsys, ["eval", "--weights", str(path), "--data", str(data)])
    assert f"{path}: {message}" in line


@pytest.mark.parametrize("fmt", [pytest.param("pte", marks=pytest.mark.slow), "tflite"])
def test_pte_and_tflite_whose_config_contradicts_the_program_are_refused(tmp_path, capsys, fmt):
    if fmt == "pte":
        pytest.importorskip("executorch")
        from mobilenet.export.executorch import export_pte as export
    else:
        pytest.importorskip("litert_torch")
        pytest.importorskip("ai_edge_litert")
        from mobilenet.export.litert import export_tflite as export
    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    config = json.dumps({**model.config.to_dict(), "num_classes": 3})
    path = tmp_path / f"m.{fmt}"
    export(model, path, RES, metadata={"config": config, "classes": json.dumps(["a", "b", "c"])})
    line = _error(capsys, ["predict", str(noise_image(tmp_path)), "--weights", str(path)])
    assert f"{path}: metadata 'config' says 3 classes; the program outputs 10 logits" in line


# ------------------------------------------------------------ tracebacks made one line


def test_a_classifier_at_height_by_width_is_one_line(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    args = ["export", "--model", "mobilenet_v4_hybrid_medium", "--resolution", "65x97"]
    line = _error(capsys, [*args, "--out", str(out)])
    assert "a classifier's input is square: --resolution N" in line
    assert not out.exists()


def test_quantize_of_a_segmentation_model_is_refused_at_the_start(tmp_path, capsys):
    weights = _segmenter(tmp_path)
    args = ["quantize", "--weights", str(weights), "--data", str(tmp_path / "nowhere")]
    line = _error(capsys, [*args, "--out", str(tmp_path / "q.safetensors")])
    assert f"quantize takes classifiers; {weights} holds a segmentation model" in line


def test_a_segmentation_models_onnx_file_evaluates_and_predicts_as_its_weights(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights, image = _segmenter(tmp_path), noise_image(tmp_path)
    out = tmp_path / "seg.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out)]) == 0
    assert "at 64x64" in capsys.readouterr().out
    data = _segmentation_folder(tmp_path)
    scores = []
    for source in (weights, out):
        args = ["eval", "--weights", str(source), "--data", data, "--json"]
        assert main(args) == 0, capsys.readouterr().err
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["iou"].keys() == scores[1]["iou"].keys() == {"bg", "x", "y"}
    assert scores[0]["images"] == scores[1]["images"]
    assert scores[0]["images"] == 2 and abs(scores[0]["miou"] - scores[1]["miou"]) < 1e-3
    masks = tmp_path / "masks"
    args = ["predict", str(image), "--weights", str(out), "--out", str(masks), "--json"]
    assert main(args) == 0, capsys.readouterr().err
    (result,) = json.loads(capsys.readouterr().out)
    assert Path(result["mask"]).is_file() and set(result["classes"]) <= {"bg", "x", "y"}
    line = _error(capsys, ["eval", "--weights", str(out), "--data", data,
                           "--model", "deeplabv3_mobilenet_v2"])  # fmt: skip
    assert f"{out} holds {SEG}, not deeplabv3_mobilenet_v2" in line


# ------------------------------------------------------ flags that agree with the file


def test_export_reads_the_model_from_our_file_and_takes_flags_that_agree(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    weights = str(_classifier(tmp_path))
    out = tmp_path / "m.onnx"
    assert main(["export", "--weights", weights, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    agreeing = ["--model", "mobilenet_v3_small", "--num-classes", "10", "--width-mult", "0.25"]
    assert main(["export", "--weights", weights, *agreeing, "--out", str(out)]) == 0
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-classes", "7"], "--num-classes 7 contradicts {w}, which holds 10 classes"),
        (["--model", "mobilenet_v2"], "{w} holds mobilenet_v3_small, not mobilenet_v2"),
        (["--width-mult", "0.5"], "{w} holds mobilenet_v3_small at width 0.25, not 0.5"),
    ],
)
def test_export_refuses_flags_that_contradict_the_file(tmp_path, capsys, flags, message):
    weights = str(_classifier(tmp_path))
    out = tmp_path / "m.onnx"
    line = _error(capsys, ["export", "--weights", weights, *flags, "--out", str(out)])
    assert message.format(w=weights) in line
    assert not out.exists()


def test_export_without_model_or_weights_is_one_line(tmp_path, capsys):
    line = _error(capsys, ["export", "--out", str(tmp_path / "m.onnx")])
    assert "give --model" in line


def test_eval_of_an_exported_file_takes_agreeing_flags_and_refuses_others(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = random_model("mobilenet_v3_small", RES, width_mult=0.25)
    path = _export_onnx(model, tmp_path / "m.onnx", RES, classes=json.dumps(CLASSES))
    data = str(_image_folder(tmp_path))
    args = ["eval", "--weights", str(path), "--data", data]
    agreeing = ["--model", "mobilenet_v3_small", "--width-mult", "0.25", "--resolution", "32"]
    assert main([*args, *agreeing, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    line = _error(capsys, [*args, "--width-mult", "0.5"])
    assert f"{path} holds mobilenet_v3_small at width 0.25, not 0.5" in line
    line = _error(capsys, [*args, "--model", "mobilenet_v2"])
    assert f"{path} holds mobilenet_v3_small, not mobilenet_v2" in line


def test_segmentation_eval_takes_the_files_own_width_and_size(tmp_path, capsys):
    weights = str(_segmenter(tmp_path))
    args = ["eval", "--weights", weights, "--data", _segmentation_folder(tmp_path)]
    assert main([*args, "--width-mult", "0.25", "--resolution", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 2
    line = _error(capsys, [*args, "--width-mult", "0.5"])
    assert f"{weights} holds {SEG} at width 0.25, not 0.5" in line
    line = _error(capsys, [*args, "--resolution", "32"])
    assert f"{weights} takes 64x64 images, not 32" in line


def test_detector_export_takes_its_own_size_and_refuses_another(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    model = create_model("ssdlite_mobilenet_v3_small", width_mult=0.25, num_classes=3,
                         image_size=64)  # fmt: skip
    categories = [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]
    meta = {"task": "detection", "categories": json.dumps(categories)}
    weights = str(save_weights(model, tmp_path / "det.safetensors", meta))
    out = tmp_path / "det.onnx"
    args = ["export", "--weights", weights, "--out", str(out)]
    assert main([*args, "--resolution", "64", "--num-classes", "3"]) == 0
    assert "at 64x64" in capsys.readouterr().out
    line = _error(capsys, [*args, "--resolution", "96"])
    assert f"{weights} holds a detector of 64x64 images, not 96" in line


def test_export_of_a_model_that_outputs_nan_says_so(tmp_path, capsys):
    model = random_model("mobilenet_v3_small", 32, 0.25)
    with torch.no_grad():  # finite weights (NaN ones are refused at load) that overflow
        model.classifier.weight.fill_(3e38)
    weights = save_weights(model, tmp_path / "nan.safetensors")
    out = tmp_path / "nan.onnx"
    assert main(["export", "--weights", str(weights), "--out", str(out), "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert "outputs NaN or infinite values" in err and err.count("\n") == 1, err
    assert not out.exists()
