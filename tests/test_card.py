"""The model card: one writer and one reader of a file's model facts, for every format."""

import json

import pytest

from mobilenet.card import CARD_VERSION, ModelCard
from mobilenet.data.preprocess import ours
from mobilenet.errors import CheckpointError


def _card(**changes) -> ModelCard:
    card = ModelCard(
        config={"name": "mobilenet_v2", "width_mult": 0.5, "num_classes": 3},
        task="classification",
        classes=("cat", "dog", "fox"),
        input_size=(160, 160),
        preprocess=ours(160),
        origin={"layout": "torchvision", "source": "mobilenet_v2.tv_in1k"},
        extra={"epoch": "4", "val_top1": "91.0000"},
    )
    return card.replace(**changes)


def test_a_card_reads_back_as_written():
    card = _card()
    meta = card.metadata()
    assert meta["card"] == str(CARD_VERSION) and meta["resolution"] == "160"
    assert all(isinstance(v, str) for v in meta.values())
    back = ModelCard.read(meta, "m.safetensors")
    assert back.replace(toolkit=None) == card.replace(toolkit=None)
    assert back.toolkit == meta["toolkit"] and back.resolution == 160
    assert back.name == "mobilenet_v2" and back.num_classes == 3


def test_int8_and_rectangular_cards_read_back():
    scheme = {"method": "ptq", "scheme": "onnxruntime-qdq", "calibration_images": 64}
    card = _card(precision="int8", quantization=scheme, input_size=(512, 1024), preprocess=None)
    meta = card.metadata()
    assert meta["resolution"] == "512x1024" and json.loads(meta["quantization"]) == scheme
    back = ModelCard.read(meta, "m.onnx")
    assert back.input_size == (512, 1024) and back.resolution is None
    assert back.precision == "int8" and back.quantization == scheme


def test_files_written_before_the_card_still_read():
    legacy = {
        "task": "detection",
        "categories": json.dumps([{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}]),
        "config": json.dumps({"name": "ssdlite_mobilenet_v3_small", "num_classes": 3}),
    }
    card = ModelCard.read(legacy, "old.safetensors")
    assert card.classes == ("car", "bus") and card.category_ids == (3, 7)
    seg = ModelCard.read({"task": "segmentation", "image_size": "64x96"}, "old.safetensors")
    assert seg.input_size == (64, 96)
    int8 = ModelCard.read({"precision": "int8", "quantization": "x86-qat"}, "old.safetensors")
    assert int8.quantization == {"scheme": "x86-qat"}


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("classes", "[1, 2]", "metadata 'classes' is not a list of class names"),
        ("classes", "{", "metadata 'classes' is not JSON"),
        ("resolution", "32px", "metadata 'resolution' must be a positive integer or HxW"),
        ("resolution", "99999", "metadata 'resolution' '99999' is not an input size"),
        ("config", '{"num_classes": 3}', "metadata 'config' names no model"),
        ("config", '{"name": "m", "num_classes": -1}', "metadata 'config' says -1 classes"),
        ("task", "captioning", "metadata 'task' 'captioning' is not one of"),
        ("precision", "int4", "metadata 'precision' 'int4' is unknown"),
        ("card", "2", "model card version '2' is not one this mobilenet reads"),
        ("category_ids", '["a"]', "metadata 'category_ids' is not a list of integers"),
    ],
)
def test_a_damaged_card_is_one_line_naming_the_file(key, value, says):
    meta = {**_card().metadata(), key: value}
    with pytest.raises(CheckpointError) as caught:
        ModelCard.read(meta, "m.onnx")
    message = str(caught.value)
    assert message.startswith("m.onnx: ") and says in message and "\n" not in message


def test_extra_keys_pass_through_and_never_shadow_the_cards():
    card = _card(extra={"epoch": "2", "classes": "[]", "resolution": "1"})
    meta = card.metadata()
    assert meta["epoch"] == "2" and json.loads(meta["classes"]) == ["cat", "dog", "fox"]
    assert meta["resolution"] == "160"
