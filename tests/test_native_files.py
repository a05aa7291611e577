"""Exported files (.onnx, .pte, .tflite) are sealed with a digest checked on load, and the
native runtimes read a file in a child process first: a damaged file is one line, never a
crash of the process or a changed score. Skipped without the runtimes."""

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("executorch")
pytest.importorskip("litert_torch")

from mobilenet import CheckpointError, MobileNetError, native
from mobilenet.export.executorch import export_pte, read_pte
from mobilenet.export.litert import export_tflite, read_tflite
from mobilenet.export.onnx import export_onnx, onnx_session, read_metadata, set_metadata
from mobilenet.integrity import MARKER, seal

from .helpers import ENV, noise_image, random_model

RES = 32
EXPORTS = {"onnx": export_onnx, "pte": export_pte, "tflite": export_tflite}
READERS = {
    "onnx": onnx_session,
    "pte": read_pte,
    "tflite": lambda path, **kwargs: read_tflite(path, threads=1, **kwargs),
}
RUNTIME = {"pte": "executorch", "tflite": "litert"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The model and its three files, exported once, and the cache their verdicts went to."""
    folder = tmp_path_factory.mktemp("exported")
    model = random_model("mobilenet_v3_small", RES, 0.25)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILENET_HOME", str(folder / "home"))
        for suffix, export in EXPORTS.items():
            export(model, folder / f"m.{suffix}", RES)
    return model, folder


def _resealed(data: bytes) -> bytes:
    """``data`` with its digest computed again: a damaged file that the digest passes."""
    start = data.index(MARKER.encode()) + len(MARKER)
    return seal(data[:start] + b"0" * 64 + data[start + 64 :])


def _weights_offset(data: bytes, model) -> int:
    """The middle of the largest of the model's weight matrices among the file's bytes."""
    for parameter in sorted(model.parameters(), key=lambda p: -p.numel()):
        found = data.find(parameter.detach().numpy().tobytes())
        if found >= 0:
            return found + parameter.numel() * 2
    raise AssertionError("no weights of the model found in the file")


def _xnnpack_key_damaged(data: bytes) -> bytes:
    """The program with the first key of its XNNPACK graph (the SHA-256 in hex that names
    a weight tensor) made invalid UTF-8, sealed again. The compiler logs the key it cannot
    find, and ExecuTorch's log sink aborts the process decoding it (executorch 1.5)."""
    blob = data.index(b"XH00") - 4  # XNNPACK's header: magic at 4, its flatbuffer at 10
    start = blob + int.from_bytes(data[blob + 10 : blob + 14], "little")
    size = int.from_bytes(data[blob + 14 : blob + 18], "little")
    key = start + re.search(rb"[0-9a-f]{64}", data[start : start + size]).start()
    return _resealed(data[:key] + b"\xd7" + data[key + 1 :])


def _input_name_damaged(data: bytes) -> bytes:
    """The model with the name of its input tensor made invalid UTF-8, sealed again."""
    from ai_edge_litert import schema_py_generated as schema

    graph = schema.Model.GetRootAs(data, 0).Subgraphs(0)
    tensor = graph.Tensors(graph.Inputs(0))
    field = tensor._tab.Pos + tensor._tab.Offset(10)  # Tensor.name, its fourth field
    name = field + int.from_bytes(data[field : field + 4], "little") + 4
    assert data[name:].startswith(tensor.Name())
    return _resealed(data[:name] + b"\xd5" + data[name + 1 :])


def abort_probe(data: bytes, what: str) -> None:
    """A runtime that says why, then aborts the process (run in the child process)."""
    print("E 00:00:00.000001 pretend.cpp:1] the graph is wrong", file=sys.stderr, flush=True)
    os.abort()


def _no_child(*args, **kwargs):
    raise AssertionError("a child process was started")


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    return message


@pytest.mark.parametrize("suffix", list(EXPORTS))
def test_a_flipped_weight_byte_is_refused_by_the_digest(suffix, exported, tmp_path, monkeypatch):
    model, folder = exported
    monkeypatch.setattr(subprocess, "run", _no_child)  # refused before any runtime reads it
    data = (folder / f"m.{suffix}").read_bytes()
    at = _weights_offset(data, model)
    bad = tmp_path / f"bad.{suffix}"
    bad.write_bytes(data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :])
    with pytest.raises(CheckpointError, match="damaged: its bytes do not match the digest") as e:
        READERS[suffix](bad)
    _one_line(e, bad)


@pytest.mark.parametrize("suffix", list(EXPORTS))
def test_a_file_without_a_digest_loads_with_a_note(suffix, exported, tmp_path):
    _, folder = exported
    data = (folder / f"m.{suffix}").read_bytes()
    assert data.count(MARKER.encode()) == 1
    plain = tmp_path / f"plain.{suffix}"
    plain.write_bytes(data.replace(MARKER.encode(), b"x" * len(MARKER)))
    if suffix in RUNTIME:  # what this test is about is the note, not the child process
        native.record_verified(plain.read_bytes(), RUNTIME[suffix])
    with pytest.warns(UserWarning, match=f"{re.escape(str(plain))} carries no digest"):
        READERS[suffix](plain)


@pytest.mark.parametrize("suffix", list(RUNTIME))
def test_exports_record_their_verdict(suffix, exported, monkeypatch):
    _, folder = exported
    monkeypatch.setenv("MOBILENET_HOME", str(folder / "home"))
    data = (folder / f"m.{suffix}").read_bytes()
    assert native.verified_path(data, RUNTIME[suffix]).exists()
    monkeypatch.setattr(subprocess, "run", _no_child)
    READERS[suffix](folder / f"m.{suffix}")


def test_the_verdict_is_kept_by_the_files_digest(exported, monkeypatch):
    _, folder = exported
    path = folder / "m.tflite"
    verdict = native.verified_path(path.read_bytes(), "litert")
    assert not verdict.exists()  # this test's cache is empty
    started, real = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: started.append(a) or real(*a, **k))
    read_tflite(path)
    assert len(started) == 1 and verdict.exists()
    read_tflite(path)
    assert len(started) == 1


def test_a_runtime_that_crashes_in_the_child_is_one_line(exported, tmp_path, monkeypatch):
    _, folder = exported
    probe = f"{__name__}:abort_probe"
    monkeypatch.setitem(
        native.RUNTIMES, "litert", dataclasses.replace(native.RUNTIMES["litert"], probe=probe)
    )
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))  # the child finds tests
    path = tmp_path / "m.tflite"
    path.write_bytes((folder / "m.tflite").read_bytes())
    with pytest.raises(MobileNetError) as e:
        read_tflite(path)
    assert _one_line(e, path) == (
        f"the LiteRT runtime crashed reading {path} (SIGABRT): the file is damaged "
        "(LiteRT said: the graph is wrong)"
    )
    assert not native.verified_path(path.read_bytes(), "litert").exists()


def test_a_program_that_aborts_executorch_is_one_line(exported, tmp_path):
    _, folder = exported
    bad = tmp_path / "bad.pte"
    bad.write_bytes(_xnnpack_key_damaged((folder / "m.pte").read_bytes()))
    with pytest.raises(MobileNetError) as e:
        read_pte(bad)
    message = _one_line(e, bad)
    assert message.startswith(
        f"the ExecuTorch runtime crashed reading {bad} (SIGABRT): the file is damaged "
        "(ExecuTorch said: what(): UnicodeDecodeError: 'utf-8' codec can't decode byte 0xd7"
    ), message
    assert not native.verified_path(bad.read_bytes(), "executorch").exists()


def test_a_tensor_name_that_is_not_utf8_is_one_line(exported, tmp_path):
    _, folder = exported
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(_input_name_damaged((folder / "m.tflite").read_bytes()))
    expected = f"{bad}: not a model LiteRT can load ('utf-8' codec can't decode byte 0xd5"
    for verify in (False, True):  # in this process, and as the child says it
        with pytest.raises(MobileNetError) as e:
            read_tflite(bad, verify=verify)
        assert _one_line(e, bad).startswith(expected), str(e.value)


def test_metadata_written_again_is_sealed_again(exported, tmp_path):
    _, folder = exported
    path = tmp_path / "m.onnx"
    path.write_bytes((folder / "m.onnx").read_bytes())
    metadata = read_metadata(onnx_session(path))
    set_metadata(path, {**metadata, "classes": '["x"]'})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: the file carries its new digest
        assert read_metadata(onnx_session(path))["classes"] == '["x"]'
    assert path.read_bytes().count(MARKER.encode()) == 1


@pytest.mark.slow
def test_predict_on_a_program_that_aborts_executorch_is_exit_2(exported, tmp_path):
    _, folder = exported
    bad = tmp_path / "bad.pte"
    bad.write_bytes(_xnnpack_key_damaged((folder / "m.pte").read_bytes()))
    command = [sys.executable, "-m", "mobilenet", "predict", "--weights", str(bad)]
    env = {**ENV, "MOBILENET_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [*command, str(noise_image(tmp_path))], capture_output=True, text=True, env=env
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(
        f"mobilenet predict: error: the ExecuTorch runtime crashed reading {bad} (SIGABRT)"
    )
