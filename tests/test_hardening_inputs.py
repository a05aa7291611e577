"""Bad inputs refused in one line or skipped with a count: COCO folders, detection and
classification inputs, damaged checkpoint metadata, and calibration data smaller than asked."""

import json
import os
import threading
import warnings

import pytest
import torch
from PIL import Image

from mobilenet import create_model
from mobilenet.card import Category
from mobilenet.classification.predict import load_trained, predict
from mobilenet.cli import main
from mobilenet.deployed import Trained
from mobilenet.detection.data import CocoDetection
from mobilenet.detection.predict import detect_images, load_detector, trained_detector
from mobilenet.errors import CheckpointError, MobileNetError
from mobilenet.weights import save_weights

# --------------------------------------------------------------------------- COCO files


def _coco() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 32, "height": 24},
            {"id": 2, "file_name": "b.png", "width": 32, "height": 24},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [4, 4, 8, 8]},
        ],
        "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}],
    }


def _write(root, coco, images=("a.png", "b.png")):
    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", (32, 24), (90, 120, 150)).save(root / name)
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _set(path, value):
    """A change to the good file: ``path`` is a list of keys/indices, None deletes."""

    def change(coco):
        target = coco
        for key in path[:-1]:
            target = target[key]
        if value is None:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return coco

    return change


STRUCTURAL = [
    ("not an object", lambda c: [c], "not an object"),
    ("no images", _set(["images"], None), "no 'images'"),
    ("images not a list", _set(["images"], {"id": 1}), "'images' must be a list"),
    ("annotations not a list", _set(["annotations"], "x"), "'annotations' must be a list"),
    ("categories not a list", _set(["categories"], 3), "'categories' must be a list"),
    ("image not an object", _set(["images", 1], 5), r"images\[1\] must be an object"),
    ("image id missing", _set(["images", 0, "id"], None), r"images\[0\] has no 'id'"),
    ("image id a string", _set(["images", 0, "id"], "1"), r"images\[0\]: 'id' must be an int"),
    ("image id a bool", _set(["images", 0, "id"], True), r"'id' must be an integer"),
    ("file_name missing", _set(["images", 1, "file_name"], None), "has no 'file_name'"),
    ("file_name a number", _set(["images", 1, "file_name"], 7), "'file_name' must be a string"),
    ("width a string", _set(["images", 0, "width"], "32"), "'width' must be an integer"),
    ("height alone", _set(["images", 0, "width"], None), "one of width and height"),
    ("image_id missing", _set(["annotations", 0, "image_id"], None), "has no 'image_id'"),
    ("image_id a string", _set(["annotations", 1, "image_id"], "2"), "'image_id' must be"),
    ("category_id missing", _set(["annotations", 0, "category_id"], None), "no 'category_id'"),
    ("category_id a string", _set(["annotations", 0, "category_id"], "3"), "'category_id' must"),
    ("iscrowd odd", _set(["annotations", 0, "iscrowd"], "yes"), "iscrowd must be 0 or 1"),
    ("category id a string", _set(["categories", 0, "id"], "3"), r"categories\[0\]: 'id' must"),
    ("category name missing", _set(["categories", 1, "name"], None), "has no 'name'"),
    ("parent folder", _set(["images", 0, "file_name"], "../a.png"), "'../a.png' leads out"),
    ("absolute", _set(["images", 0, "file_name"], "/etc/passwd"), "'/etc/passwd' leads out"),
    ("inner ..", _set(["images", 0, "file_name"], "images/../../a.png"), "leads out"),
    ("windows ..", _set(["images", 0, "file_name"], "..\\a.png"), "leads out"),
    ("windows drive", _set(["images", 0, "file_name"], "C:\\a.png"), "leads out"),
]


@pytest.mark.parametrize(
    "change, message", [s[1:] for s in STRUCTURAL], ids=[s[0] for s in STRUCTURAL]
)
def test_structural_problems_are_one_line_naming_the_file(tmp_path, change, message):
    # a file outside the folder that an escaping name would reach
    Image.new("RGB", (32, 24)).save(tmp_path / "a.png")
    root = _write(tmp_path / "d", change(_coco()))
    with pytest.raises(MobileNetError, match=message) as caught:
        CocoDetection(root)
    text = str(caught.value)
    assert str(root / "annotations.json") in text and "\n" not in text


def test_structural_problem_from_the_cli_is_one_line(tmp_path, capsys):
    model = create_model("ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3)
    weights = save_weights(model, tmp_path / "w.safetensors", {"categories": _CATEGORIES})
    root = _write(tmp_path / "d", _set(["images", 0, "file_name"], "/etc/passwd")(_coco()))
    assert main(["detect", "eval", "--weights", str(weights), "--data", str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mobilenet ") and "leads out" in err and err.count("\n") == 1


def test_corrupt_and_repeated_entries_are_skipped_with_one_warning(tmp_path):
    coco = _coco()
    coco["images"] += [
        {"id": 3, "file_name": "text.png", "width": 32, "height": 24},  # a text file
        {"id": 4, "file_name": "cut.png"},  # truncated, no size given: read from the file
        {"id": 5, "file_name": "cut.jpg", "width": 32, "height": 24},  # header fine, data cut
        {"id": 1, "file_name": "b.png", "width": 32, "height": 24},  # id 1 again
        {"id": 6, "file_name": "sub", "width": 32, "height": 24},  # a folder, not a file
    ]
    coco["categories"].append({"id": 3, "name": "again"})
    coco["annotations"].append({"id": 9, "image_id": 42, "category_id": 3, "bbox": [1, 1, 4, 4]})
    root = _write(tmp_path / "d", coco)
    (root / "text.png").write_text("not an image\n")
    (root / "cut.png").write_bytes((root / "a.png").read_bytes()[:20])
    Image.new("RGB", (32, 24), (10, 200, 30)).save(root / "full.jpg")
    (root / "cut.jpg").write_bytes((root / "full.jpg").read_bytes()[:200])
    (root / "sub").mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = CocoDetection(root)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    for part in (
        "3 images skipped (corrupt)",
        "1 images skipped (id listed twice, the first kept)",
        "1 categories skipped (id listed twice, the first kept)",
        "1 images skipped (file missing)",
        "1 boxes skipped (unknown image id)",
    ):
        assert part in messages[0]
    assert [info["file_name"] for info in data.images] == ["a.png", "b.png"]
    assert data.classes == ["a", "b"]  # the first category 3 kept
    assert [t["labels"].tolist() for t in data.targets] == [[1], [2]]
    for i in range(len(data)):
        data[i]  # everything left loads


# --------------------------------------------------------------------------- detect predict

_CATEGORIES = json.dumps([{"id": 3, "name": "a"}, {"id": 7, "name": "b"}])


@pytest.fixture(scope="module")
def detector() -> Trained:
    torch.manual_seed(0)
    model = create_model(
        "ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3, image_size=64
    )
    return trained_detector(model.eval(), [Category(3, "a"), Category(7, "b")])


def test_drawings_of_inputs_with_the_same_name_do_not_overwrite(tmp_path, detector):
    sizes = {"a/1.png": (40, 30), "b/1.png": (50, 20), "c/1-2.png": (24, 24), "d/1.jpg": (30, 40)}
    paths = []
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", size, (200, 100, 50)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "drawn"
    results = detect_images(detector, paths, out, min_score=0.0)
    drawn = [r["drawn"] for r in results]
    assert [os.path.basename(d) for d in drawn] == ["1.png", "1-2.png", "1-2-2.png", "1-3.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(os.path.basename(d) for d in drawn)
    for result, size in zip(results, sizes.values(), strict=True):
        assert Image.open(result["drawn"]).size == size  # each drawing is its own image


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return str(path)


def _returns_quickly(call):
    """Run ``call`` in a thread: a FIFO opened for reading would block it for ever. (The
    wait is a safety net, long enough for a loaded machine to load a model and refuse.)"""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(600)
    assert not thread.is_alive(), "blocked on a FIFO"
    return outcome


def test_detect_refuses_folders_and_fifos_before_reading_anything(tmp_path, detector, fifo):
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32)).save(good)
    out = tmp_path / "drawn"
    for bad, what in ((fifo, "a FIFO"), (str(tmp_path), "a folder")):
        outcome = _returns_quickly(lambda bad=bad: detect_images(detector, [str(good), bad], out))
        assert isinstance(outcome.get("error"), MobileNetError), outcome
        assert what in str(outcome["error"]) and bad in str(outcome["error"])
        assert not out.exists()  # the good image before it was not drawn either


def test_classify_predict_refuses_a_fifo(tmp_path, fifo):
    model = create_model("mobilenet_v3_small", width_mult=0.35, num_classes=3).eval()
    trained = Trained(model, ["x", "y", "z"], 32)
    outcome = _returns_quickly(lambda: predict(trained, [fifo], engine="eager"))
    assert isinstance(outcome.get("error"), MobileNetError) and "FIFO" in str(outcome["error"])


def test_detect_predict_cli_refuses_a_fifo_in_one_line(tmp_path, fifo, capsys):
    model = create_model("ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3)
    weights = save_weights(model, tmp_path / "w.safetensors", {"categories": _CATEGORIES})
    outcome = _returns_quickly(lambda: main(["detect", "predict", "--weights", str(weights), fifo]))
    assert outcome.get("value") == 2
    err = capsys.readouterr().err
    assert "FIFO" in err and err.count("\n") == 1


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "key, value",
    [
        ("classes", "not json ["),
        ("classes", '{"a": 1}'),
        ("classes", "[1, 2, 3]"),
        ("resolution", "abc"),
        ("resolution", "0"),
        ("resolution", "-32"),
        ("resolution", "2.5"),
    ],
)
def test_damaged_classifier_metadata_is_one_checkpoint_error(tmp_path, capsys, key, value):
    model = create_model("mobilenet_v3_small", width_mult=0.35, num_classes=3)
    metadata = {"classes": json.dumps(["x", "y", "z"]), "resolution": "32", key: value}
    weights = save_weights(model, tmp_path / "w.safetensors", metadata)
    with pytest.raises(CheckpointError, match=f"metadata '{key}'") as caught:
        load_trained(str(weights))
    assert str(weights) in str(caught.value)
    image = tmp_path / "i.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["predict", "--weights", str(weights), str(image)]) == 2
    err = capsys.readouterr().err
    assert f"metadata '{key}'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "value, message",
    [
        ("not json", "is not JSON"),
        ('{"id": 3}', "is not a list"),
        ('[{"id": "3", "name": "a"}, {"id": 7, "name": "b"}]', "is not a list"),
        ('[{"id": 3, "name": "a"}]', "lists 1 categories; the detector has 2"),
    ],
)
def test_damaged_detector_categories_are_one_checkpoint_error(tmp_path, value, message):
    model = create_model("ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3)
    weights = save_weights(model, tmp_path / "w.safetensors", {"categories": value})
    with pytest.raises(CheckpointError, match=message) as caught:
        load_detector(weights)
    assert str(weights) in str(caught.value) and "'categories'" in str(caught.value)


def test_int8_file_with_a_bad_resolution_is_one_checkpoint_error(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mobilenet.card import ModelCard
    from mobilenet.export.int8 import quantize_model
    from mobilenet.export.int8_file import save_int8
    from mobilenet.weights import sealed_safetensors

    model = create_model("mobilenet_v3_small", width_mult=0.35, num_classes=3).eval()
    int8 = quantize_model(model, [torch.randn(2, 3, 32, 32)], resolution=32)
    path = save_int8(
        int8, tmp_path / "m.safetensors", ModelCard(classes=("x", "y", "z"), input_size=(32, 32))
    )
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    for key, value in (("resolution", "-1"), ("classes", "[")):
        bad = tmp_path / f"bad-{key}.safetensors"
        # Sealed anew, as a crafted file would be: the metadata itself is what is refused.
        bad.write_bytes(sealed_safetensors(load_file(str(path)), {**metadata, key: value}))
        with pytest.raises(CheckpointError, match=f"metadata '{key}'"):
            load_trained(str(bad))


# --------------------------------------------------------------------------- calibration


@pytest.fixture
def small_folder(tmp_path):
    for c, colour in (("x", (250, 0, 0)), ("y", (0, 250, 0)), ("z", (0, 0, 250))):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2 if c == "z" else 1):
            Image.new("RGB", (40, 40), colour).save(tmp_path / "data" / c / f"{i}.png")
    return str(tmp_path / "data")  # 4 images


@pytest.fixture
def float_trained() -> Trained:
    torch.manual_seed(0)
    return Trained(create_model("mobilenet_v3_small", width_mult=0.35, num_classes=3).eval(),
                   ["x", "y", "z"], 32)  # fmt: skip


def test_ptq_on_fewer_images_than_asked_says_how_many(tmp_path, small_folder, float_trained):
    from safetensors import safe_open

    from mobilenet.export.int8 import quantize_torch
    from mobilenet.export.int8_file import save_int8

    told = []
    int8 = quantize_torch(float_trained, small_folder, 512, progress=told.append)
    assert int8.calibration_images == 4
    assert told == [f"{small_folder} holds 4 images: calibrating on all 4"]
    path = save_int8(int8, tmp_path / "m.safetensors", float_trained.model_card())
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["quantization"])["calibration_images"] == 4
    assert load_trained(str(path)).model.calibration_images == 4


def test_onnx_ptq_on_fewer_images_than_asked_says_how_many(tmp_path, small_folder, float_trained):
    pytest.importorskip("onnxruntime.quantization")
    from mobilenet.export.quantize import calibration_images_of, quantize_onnx

    told = []
    out = quantize_onnx(float_trained, small_folder, tmp_path / "q.onnx", 512, progress=told.append)
    assert calibration_images_of(out) == 4
    assert told == [f"{small_folder} holds 4 images: calibrating on all 4"]
