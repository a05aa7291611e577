"""Crafted and damaged .pt2 files: refused in one line before torch.export.load runs any of
their contents; a changed byte found by its CRC-32 or by the digest; metadata that
contradicts the program refused rather than evaluated."""

import io
import json
import re
import struct
import zipfile
from pathlib import Path

import pytest
import sympy
import torch

from mobilenet import CheckpointError, MobileNetError
from mobilenet.cli import main
from mobilenet.export.pt2 import export_pt2, read_pt2, records_digest

from .helpers import random_model

RES = 32
GRAPH = "models/model.json"
WEIGHTS = "data/weights/model_weights_config.json"
META = "extra/mobilenet.json"
MARKER = "PWNED"  # what the crafted names below would create in the working folder


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    model = random_model("mobilenet_v3_small", RES, 0.25)
    export_pt2(model, path, RES, {"classes": json.dumps([f"c{i}" for i in range(10)])})
    return path


def _records(path: Path) -> dict[str, bytes]:
    """The records of a .pt2 archive by their names inside its folder, in archive order."""
    with zipfile.ZipFile(path) as archive:
        return {i.filename.split("/", 1)[1]: archive.read(i) for i in archive.infolist()}


def _write(records: dict[str, bytes], target: Path) -> Path:
    """A .pt2 archive of ``records`` built by zipfile (which computes every CRC-32)."""
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in records.items():
            archive.writestr(f"archive/{name}", data)
    return target


def _edit(path: Path, target: Path, changes: dict) -> Path:
    """A copy of ``path`` with ``changes`` applied: record name to a function of its JSON
    (a .json record) or of its bytes (any other)."""
    records = _records(path)
    for name, change in changes.items():
        if name.endswith(".json"):
            records[name] = json.dumps(change(json.loads(records[name]))).encode()
        else:
            records[name] = change(records[name])
    return _write(records, target)


def _rename(value, old: str, new: str):
    """``value`` (JSON) with every string and key equal to ``old`` replaced by ``new``: a
    consistent rename, as a crafted file would make it."""
    if isinstance(value, dict):
        return {(new if k == old else k): _rename(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, old, new) for v in value]
    return new if value == old else value


def _conv_input(graph):
    """The first convolution's named argument ``input``, as the graph stores it."""
    node = graph["graph_module"]["graph"]["nodes"][0]
    return next(a for a in node["inputs"] if a["name"] == "input")


def _set_forward_names(graph, names):
    graph["graph_module"]["module_call_graph"][0]["signature"]["forward_arg_names"] = names
    return graph


def _set_argument_name(graph, name):
    _conv_input(graph)["name"] = name
    return graph


_RUN = f"__import__('os').system('touch {MARKER}')"
# Where names that torch.fx writes into the Python code it generates live, and a crafted name
# for each (the graph's change, the name). torch 2.14 runs the input's when
# torch.export.load execs that code (def forward(self, ..., x=<code>)); it renames nodes
# and others end as a syntax error, but each is refused before torch sees it.
NAMES = {
    "input": (lambda g: _rename(g, "x", f"x={_RUN}"), f"x={_RUN}"),
    "forward argument": (lambda g: _set_forward_names(g, [f"x={_RUN}"]), f"x={_RUN}"),
    "node": (lambda g: _rename(g, "conv2d", f"globals()[{_RUN}]"), f"globals()[{_RUN}]"),
    "output": (lambda g: _rename(g, "linear_1", f"globals()[{_RUN}]"), f"globals()[{_RUN}]"),
    "argument": (lambda g: _set_argument_name(g, f"input={_RUN}"), f"input={_RUN}"),
    "keyword": (lambda g: _rename(g, "conv2d", "lambda"), "lambda"),
    "builtin": (lambda g: _rename(g, "conv2d", "getattr"), "getattr"),
    "non-ascii": (lambda g: _rename(g, "conv2d", "conv2d\u00e9"), "conv2d\u00e9"),
    "symbol": (lambda g: _rename(g, "s77", "s77;x"), "s77;x"),
    "long": (lambda g: _rename(g, "conv2d", "c" * 300), "c" * 80),
}


@pytest.mark.parametrize("where", list(NAMES))
def test_a_name_that_would_become_code_is_refused_before_torch_sees_it(
    good, tmp_path, monkeypatch, where
):
    monkeypatch.chdir(tmp_path)
    change, name = NAMES[where]
    bad = _edit(good, tmp_path / "bad.pt2", {GRAPH: change})
    with pytest.raises(MobileNetError, match=r"bad\.pt2: its program names an? \w+ ") as e:
        read_pt2(bad)
    assert f" {name!r}; only plain names load" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / MARKER).exists()


def test_a_parameter_path_that_would_become_code_is_refused(good, tmp_path, monkeypatch):
    # getattr(self.features, "0") and <code> or ...: run by every call of the program
    monkeypatch.chdir(tmp_path)
    path = "features.0.conv.weight"
    crafted = 'features.0") and getattr(__import__("os"),"system")("touch PWNED") or ("'
    renamed = {GRAPH: lambda g: _rename(g, path, crafted)}
    renamed[WEIGHTS] = lambda c: _rename(c, path, crafted)
    bad = _edit(good, tmp_path / "bad.pt2", renamed)
    with pytest.raises(MobileNetError, match=r"bad\.pt2: its program names weights 'features\.0\""):
        read_pt2(bad)
    only_graph = _edit(good, tmp_path / "graph.pt2", {GRAPH: renamed[GRAPH]})
    with pytest.raises(MobileNetError, match=r"its program names a parameter 'features\.0\""):
        read_pt2(only_graph)
    assert not (tmp_path / MARKER).exists()


def _set_input_size(graph, expression):
    values = graph["graph_module"]["graph"]["tensor_values"]
    values["x"]["sizes"][0] = {"as_expr": {"expr_str": expression, "hint": {"as_int": 2}}}
    return graph


@pytest.mark.parametrize(
    "expression",
    [
        "9**9**9**9",  # computes without end in sympify
        "Integer(99999999999999999999999999)",
        "Pow(Integer(9), Pow(Integer(9), Integer(9)))",
        "Mul(" * 40 + "Integer(2)" + ", Integer(2))" * 40,  # deeper than the grammar takes
        "Symbol('s77', positive=True, integer=True) + 1",
        "Symbol('s77', evaluate=__import__('os').getpid())",
        "Symbol('x y', positive=True)",
        "s77",
    ],
)
def test_a_shape_expression_outside_our_grammar_is_refused(good, tmp_path, monkeypatch, expression):
    def no_sympify(*args, **kwargs):
        raise AssertionError("sympify must not see text the grammar has not accepted")

    monkeypatch.setattr(sympy, "sympify", no_sympify)  # torch's deserializer calls it
    bad = _edit(good, tmp_path / "bad.pt2", {GRAPH: lambda g: _set_input_size(g, expression)})
    message = re.escape(f"unexpected shape expression {expression[:80]!r}")
    with pytest.raises(MobileNetError, match=message):
        read_pt2(bad)


def test_records_our_export_does_not_write_are_refused(good, tmp_path):
    records = _records(good)
    extra = _write({**records, "extra/notes.txt": b"hello"}, tmp_path / "extra.pt2")
    with pytest.raises(MobileNetError, match=r"extra\.pt2: holds 'extra/notes\.txt'"):
        read_pt2(extra)
    twice = tmp_path / "twice.pt2"
    _write(records, twice)
    with zipfile.ZipFile(twice, "a") as archive, pytest.warns(UserWarning, match="Duplicate"):
        archive.writestr(f"archive/{GRAPH}", records[GRAPH])
    with pytest.raises(MobileNetError, match=r"twice\.pt2: holds 'models/model\.json' twice"):
        read_pt2(twice)
    packed = tmp_path / "packed.pt2"
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in records.items():
            archive.writestr(f"archive/{name}", data)
    with pytest.raises(MobileNetError, match=r"holds '.+' compressed"):
        read_pt2(packed)
    guards = _edit(good, tmp_path / "guards.pt2", {GRAPH: lambda g: {**g, "guards_code": ["1"]}})
    with pytest.raises(MobileNetError, match="holds guard code"):
        read_pt2(guards)


def _data_offset(data: bytes, filename: str) -> int:
    """Where a stored record's bytes begin in a zip archive."""
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo(filename)
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def test_a_flipped_byte_in_a_weight_fails_its_crc(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[_data_offset(bytes(data), "archive/data/weights/weight_0") + 5] ^= 0x01
    bad = tmp_path / "flipped.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"flipped\.pt2: damaged: record 'data/weights/"):
        read_pt2(bad)


def test_a_changed_weight_with_its_crc_recomputed_fails_the_digest(good, tmp_path):
    def flip(data: bytes) -> bytes:
        return bytes([data[0] ^ 0x01]) + data[1:]

    bad = _edit(good, tmp_path / "changed.pt2", {"data/weights/weight_0": flip})
    with pytest.raises(CheckpointError, match=r"changed\.pt2: damaged: its records do not"):
        read_pt2(bad)
    short = {META: lambda m: {**m, "digest": "0" * 63}}
    with pytest.raises(CheckpointError, match=r"damaged: its digest '0+' is not a SHA-256"):
        read_pt2(_edit(good, tmp_path / "short.pt2", short))


def test_the_digest_covers_every_record_but_the_metadata(good, tmp_path):
    records = _records(good)
    metadata = json.loads(records.pop(META))
    assert metadata["digest"] == records_digest(records)
    # the metadata is outside the digest: it may be edited (as the tests below do)
    edited = _edit(good, tmp_path / "edited.pt2", {META: lambda m: {**m, "x": "1"}})
    assert read_pt2(edited)[1]["x"] == "1"


def test_a_file_without_a_digest_loads_with_one_note(good, tmp_path):
    def drop(meta):
        return {k: v for k, v in meta.items() if k != "digest"}

    old = _edit(good, tmp_path / "old.pt2", {META: drop})
    with pytest.warns(UserWarning, match=r"old\.pt2 carries no digest") as caught:
        program, metadata = read_pt2(old)
    assert len(caught) == 1 and "digest" not in metadata and callable(program)


CONTRADICTIONS = {
    "resolution": (
        lambda m: {**m, "resolution": "48"},
        "its metadata says 48x48 images, its program takes 32x32",
    ),
    "class names": (
        lambda m: {**m, "classes": json.dumps(["a", "b", "c"])},
        "its metadata names 3 classes, its program outputs 10 logits",
    ),
    "config": (
        lambda m: {**m, "config": json.dumps({**json.loads(m["config"]), "num_classes": 1000})},
        "its metadata config has num_classes 1000, its program outputs 10 logits",
    ),
    "not a size": (
        lambda m: {**m, "resolution": "32px"},
        "metadata 'resolution' must be a positive integer or HxW, got '32px'",
    ),
}


@pytest.mark.parametrize("what", list(CONTRADICTIONS))
def test_metadata_that_contradicts_the_program_is_refused(good, tmp_path, what):
    change, message = CONTRADICTIONS[what]
    bad = _edit(good, tmp_path / "bad.pt2", {META: change})
    with pytest.raises(CheckpointError, match=re.escape(f"bad.pt2: {message}")):
        read_pt2(bad)


def test_predict_on_a_contradicting_file_is_one_line(good, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "red.png"
    Image.new("RGB", (RES, RES), (200, 30, 30)).save(image)
    for what in ("resolution", "class names"):
        bad = _edit(good, tmp_path / "bad.pt2", {META: CONTRADICTIONS[what][0]})
        assert main(["predict", "--weights", str(bad), str(image), "--json"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("mobilenet predict: error: ")
        assert CONTRADICTIONS[what][1] in err


def test_a_program_that_fails_to_run_is_one_line():
    from mobilenet.formats.pt2 import Pt2Model
    from mobilenet.models import ModelConfig

    def program(x):  # what a crafted program whose weights do not fit its operators does
        raise RuntimeError("shape '[16, 3, 3, 3]' is invalid for input of size 7\nmore")

    model = Pt2Model(program, ModelConfig(name="mobilenet_v3_small"), 32, "crafted.pt2")
    with pytest.raises(MobileNetError) as error:
        model(torch.zeros(1, 3, 32, 32))
    assert str(error.value) == (
        "crafted.pt2: the program fails to run (shape '[16, 3, 3, 3]' is invalid for input "
        "of size 7)"
    )
