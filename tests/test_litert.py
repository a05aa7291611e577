"""LiteRT (.tflite) export: checked by the LiteRT interpreter against PyTorch, metadata kept
in the flatbuffer, refusals in one line and without a partial file. Skipped where the
``litert`` extra (litert-torch, ai-edge-litert) is not installed."""

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert.interpreter")

from mobilenet import MobileNetError
from mobilenet.export import litert
from mobilenet.export.litert import (
    LAYOUT,
    export_tflite,
    export_tflite_int8,
    read_tflite,
)
from mobilenet.integrity import reseal

from .helpers import random_model

RES = 64
CLASSES = json.dumps(list("abcdefghij"))


def _model(name: str):
    return random_model(name, RES)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path of its float32 .tflite), each exported once."""
    folder = tmp_path_factory.mktemp("tflite")
    done = {}

    def get(name: str):
        if name not in done:
            model, path = _model(name), folder / f"{name}.tflite"
            assert export_tflite(model, path, RES, {"classes": CLASSES}) <= 1e-4
            done[name] = model, path
        return done[name]

    return get


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_export_matches_pytorch_and_keeps_metadata(name, exported):
    model, path = exported(name)
    run, metadata = read_tflite(path, threads=1)
    assert metadata["resolution"] == str(RES)
    assert metadata["classes"] == CLASSES
    assert json.loads(metadata["config"])["name"] == name
    assert (metadata["dtype"], metadata["layout"]) == ("float32", LAYOUT)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5, 2):  # 5: a batch size the export's check never ran
        x = torch.randn(batch, 3, RES, RES, generator=g)
        with torch.no_grad():
            expected = model(x)
        atol = 1e-4 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(run(x), expected, atol=atol, rtol=0)


def test_int8_export_is_close_to_its_reference(tmp_path):
    model = _model("mobilenet_v3_small")
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, RES, RES, generator=g) for _ in range(2)]
    path = tmp_path / "int8.tflite"
    diff = export_tflite_int8(model, iter(batches), path, RES, {"classes": CLASSES})
    run, metadata = read_tflite(path)
    assert (metadata["dtype"], metadata["calibration_images"]) == ("int8", "8")
    assert metadata["classes"] == CLASSES
    with torch.no_grad():
        expected = model(batches[0][:2])
    got = run(batches[0][:2])
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # Within what the export measured (the check bounds it by the PyTorch int8 reference).
    assert (got - expected).abs().max().item() <= diff + 1e-6
    # Full-integer: the file itself takes int8 images (the runner quantizes them).
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    # h-swish and h-sigmoid quantized: no float HARD_SWISH between DEQUANTIZE and QUANTIZE.
    operators = {d["op_name"] for d in interpreter._get_ops_details()}
    assert "HARD_SWISH" not in operators and "LOGISTIC" not in operators
    # A file of fixed batch 1: a larger batch runs image by image, with the same results.
    assert metadata["batch"] == "1"
    x = batches[1][:3]
    torch.testing.assert_close(run(x), torch.cat([run(x[i : i + 1]) for i in range(3)]))


def test_int8_without_images_is_refused(tmp_path):
    with pytest.raises(MobileNetError, match="at least one image"):
        export_tflite_int8(_model("mobilenet_v3_small"), [], tmp_path / "m.tflite", RES)
    assert list(tmp_path.iterdir()) == []


def test_nothing_written_when_the_check_fails(exported, tmp_path, monkeypatch):
    # A file that converts but computes another model: the interpreter's check refuses it.
    _, other = exported("mobilenet_v2")
    monkeypatch.setattr(litert, "_convert", lambda *args, **kwargs: other.read_bytes())
    path = tmp_path / "m.tflite"
    with pytest.raises(MobileNetError, match=r"LiteRT differs from PyTorch.*nothing written"):
        export_tflite(_model("mobilenet_v3_small"), path, RES)
    assert list(tmp_path.iterdir()) == []


def _without_our_metadata(data: bytes) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    for entry in model.metadata:
        if entry.name == litert.META_NAME.encode():
            model.buffers[entry.buffer].data = None  # our JSON (and digest) gone too
    model.metadata = [m for m in model.metadata if m.name != litert.META_NAME.encode()]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: b"", "not a .tflite file"),
        (lambda d: b"not a model" * 8, "not a .tflite file"),
        (lambda d: d[: len(d) // 2], "damaged: its bytes do not match the digest"),
        (lambda d: d[:8] + bytes(64) + d[72:], "damaged: its bytes do not match the digest"),
        (lambda d: reseal(d[:8] + bytes(64) + d[72:]), "not a model LiteRT can load"),
        (_without_our_metadata, "not a .tflite file written by mobilenet export"),
        (lambda d: litert._with_metadata(d, {"format": "other"}), "metadata is damaged"),
    ],
    ids=["empty", "text", "truncated", "zeroed", "zeroed-resealed", "foreign", "bad-metadata"],
)
def test_damaged_or_foreign_file_is_one_line(damage, message, exported, tmp_path):
    _, good = exported("mobilenet_v3_small")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(MobileNetError, match=message) as info:
        read_tflite(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_runner_checks_its_input_and_threads(exported):
    _, path = exported("mobilenet_v3_small")
    run, _ = read_tflite(path, threads=2)
    with pytest.raises(MobileNetError, match=f"takes batches of 3x{RES}x{RES} images"):
        run(torch.randn(1, 3, RES + 8, RES))
    with pytest.raises(MobileNetError, match="takes batches"):
        run(torch.randn(0, 3, RES, RES))
    with pytest.raises(MobileNetError, match="threads must be at least 1"):
        read_tflite(path, threads=0)


@pytest.mark.parametrize("module", ["litert_torch", "ai_edge_litert.interpreter"])
def test_missing_package_names_the_extra(module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(MobileNetError, match=r'pip install "mobilenet\[litert\]"') as info:
        export_tflite(_model("mobilenet_v3_small"), tmp_path / "m.tflite", RES)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
