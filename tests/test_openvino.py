"""OpenVINO IR (.xml + .bin): every zoo classifier exported and checked against PyTorch,
the model card read back, each damaged, foreign or contradicted file refused in one line
before OpenVINO reads it, and NNCF's int8 held to the project's int8 rule. Skipped where
the ``openvino`` extra is not installed."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")

import openvino as ov

from mobilenet.deployed import Trained
from mobilenet.errors import CheckpointError, MobileNetError
from mobilenet.formats import BenchCase, BenchSetup, LoadRequest, QuantizeRequest, format_named
from mobilenet.formats import openvino as openvino_format
from mobilenet.integrity import reseal

from .helpers import paper_models, random_model

FMT = format_named("openvino")
RES = 32
WIDTH = 0.25
CLASSES = [f"class {i}" for i in range(10)]
# The largest graphs: each takes several times as long as the others to convert.
SLOW = {"mobilenet_v4_conv_large", "mobilenet_v4_hybrid_medium", "mobilenet_v4_hybrid_large"}


def _export(name: str, path, res: int = RES, width: float = WIDTH, seed: int = 0):
    model = random_model(name, res, width, seed)
    card = Trained(model, CLASSES, res).model_card()
    return model, FMT.export(model, path, res, card)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small classifier's IR, exported once: (model, path of its .xml, the cache where
    the export kept its verdict: a file it has read and run needs no child process)."""
    folder = tmp_path_factory.mktemp("openvino")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILENET_HOME", str(folder / "home"))
        model, _ = _export("mobilenet_v3_small", folder / "model.xml")
    return model, folder / "model.xml", folder / "home"


@pytest.fixture
def ir(exported, monkeypatch):
    """The exported model and its .xml, read with the export's verdicts."""
    model, path, home = exported
    monkeypatch.setenv("MOBILENET_HOME", str(home))
    return model, path


@pytest.fixture
def copy(ir, tmp_path):
    """The exported IR's two files, copied where a test may change them."""
    _, path = ir
    xml, weights = tmp_path / "model.xml", tmp_path / "model.bin"
    xml.write_bytes(path.read_bytes())
    weights.write_bytes(openvino_format.weights_path(path).read_bytes())
    return xml, weights


def _reseal(xml, weights, old: str, new: str, count: int = -1) -> None:
    """Change ``old`` to ``new`` in the .xml (the first ``count`` times: -1, every time)
    and seal the pair anew: a crafted file that passes the digests."""
    text = xml.read_bytes()
    assert old.encode() in text
    text = text.replace(old.encode(), new.encode(), count)
    xml.write_bytes(reseal(text + weights.read_bytes())[: len(text)])


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in paper_models()],
)
def test_float_ir_matches_pytorch_at_batch_1_and_3(name, tmp_path):
    path = tmp_path / "model.xml"
    model, exported = _export(name, path)
    assert (exported.checked_by, exported.batch) == ("OpenVINO", "dynamic batch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]
    loaded = FMT.load(path, LoadRequest()).model
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # the file, read back, against PyTorch (unit-scale logits)
        x = torch.randn(batch, 3, RES, RES, generator=g)
        with torch.no_grad():
            expected = model(x)
        tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
        assert float((loaded(x) - expected).abs().max()) <= tolerance
    assert exported.diff <= 1e-4 * max(1.0, float(expected.abs().max()))


def test_load_round_trip(ir):
    model, path = ir
    trained = FMT.load(path, LoadRequest(model="mobilenet_v3_small", width_mult=WIDTH))
    assert (trained.classes, trained.resolution, trained.path) == (CLASSES, RES, path)
    assert trained.preprocess == Trained(model, CLASSES, RES).eval_preprocess()
    assert trained.model.engine == "openvino"
    assert trained.model.config == model.config
    assert trained.card.precision == "float32"
    assert trained.card.extra["format"] == openvino_format.FORMAT_MARK
    metadata = FMT.metadata(path)  # the card's key/values, without compiling the graph
    assert trained.card.metadata().items() <= metadata.items() and "digest" in metadata
    x = torch.randn(5, 3, RES, RES)  # a batch size the export's check never ran
    with torch.no_grad():
        assert torch.allclose(trained.model(x), model(x), atol=1e-4)
    with pytest.raises(MobileNetError) as error:
        trained.model(torch.zeros(1, 3, RES + 8, RES + 8))
    assert "takes (batch, 3, 32, 32) images" in _one_line(error)


def test_a_truncated_bin_is_refused_before_openvino_reads_it(copy):
    xml, weights = copy
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as error:
        FMT.load(xml, LoadRequest())
    assert "model.bin: damaged, or not the weights of model.xml" in _one_line(error)


def test_a_changed_weight_is_refused(copy):
    xml, weights = copy
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40  # one float of the weights, the file's size the same
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        FMT.load(xml, LoadRequest())
    assert "model.bin: damaged, or not the weights of model.xml" in _one_line(error)


def test_a_changed_byte_of_the_graph_is_refused(copy):
    xml, _ = copy
    text = xml.read_bytes()
    at = text.index(b'type="HSwish"')
    xml.write_bytes(text[:at] + b'type="HSigmo"' + text[at + len(b'type="HSwish"') :])
    with pytest.raises(CheckpointError) as error:
        FMT.load(xml, LoadRequest())
    assert "model.xml: damaged: its bytes do not match the digest" in _one_line(error)


def test_a_missing_bin_is_one_line(copy):
    xml, weights = copy
    weights.unlink()
    with pytest.raises(CheckpointError) as error:
        FMT.load(xml, LoadRequest())
    assert "model.xml: its weights file model.bin is missing" in _one_line(error)


def test_a_foreign_ir_is_refused(tmp_path):
    """An IR OpenVINO wrote, without our card, is refused before OpenVINO reads it."""
    ops = ov.opset13
    images = ops.parameter([-1, 3, RES, RES], np.float32)
    bias = ops.constant(np.ones((1, 3, 1, 1), np.float32))
    path = tmp_path / "foreign.xml"
    ov.save_model(ov.Model([ops.relu(ops.add(images, bias))], [images]), path)
    assert openvino_format.weights_path(path).is_file()
    with pytest.raises(CheckpointError) as error:
        FMT.load(path, LoadRequest())
    assert "not an OpenVINO IR written by mobilenet export/quantize" in _one_line(error)


@pytest.mark.parametrize(
    "request_, said",
    [
        (LoadRequest(model="mobilenet_v2"), "holds mobilenet_v3_small, not mobilenet_v2"),
        (LoadRequest(width_mult=0.5), "holds mobilenet_v3_small at width 0.25, not 0.5"),
        (LoadRequest(resolution=64), "takes 32x32 images, not 64"),
    ],
)
def test_a_flag_that_contradicts_the_card_is_refused(ir, request_, said):
    with pytest.raises(MobileNetError) as error:
        FMT.load(ir[1], request_)
    assert said in _one_line(error)


@pytest.mark.parametrize(
    "old, new, said",
    [
        (
            "&quot;num_classes&quot;: 10",
            "&quot;num_classes&quot;: 12",
            "metadata 'config' says 12 classes; the program outputs 10 logits",
        ),
        (
            '<resolution value="32"',
            '<resolution value="48"',
            "metadata says 48x48 images; the graph takes [?,3,32,32]",
        ),
        (
            '<precision value="float32"',
            '<precision value="int8"   ',
            "metadata 'precision' says int8; the graph holds no FakeQuantize operation",
        ),
        (
            '<task value="classification"',
            '<task value="segmentation"  ',
            "holds a segmentation model, not a classifier",
        ),
    ],
)
def test_a_card_that_contradicts_the_graph_is_refused(copy, old, new, said):
    """Crafted (sealed anew, so the digests pass): the card is held to the graph by the
    checks a child process runs before this one reads the file (run here, in process:
    only the card is changed)."""
    xml, weights = copy
    _reseal(xml, weights, old, new)
    data = openvino_format.ir_bytes(xml.read_bytes(), weights.read_bytes())
    with pytest.raises(MobileNetError) as error:
        openvino_format.probe_ir(data, str(xml))
    assert said in _one_line(error)


def test_a_crafted_graph_is_run_in_a_child_process_first(copy):
    """A convolution's dilation of -1 passes OpenVINO's reader; run, it gives logits for
    no image and writes where it should not (in a process that goes on loading, a crash
    later). The child process runs it first and refuses it in one line."""
    xml, weights = copy
    dilation = 'dilations="1, 1" pads_begin="0, 0"'
    _reseal(xml, weights, dilation, dilation.replace('"1, 1"', '"-1, 1"'), count=1)
    with pytest.raises(MobileNetError) as error:
        FMT.load(xml, LoadRequest())
    said = _one_line(error)
    assert said.startswith(f"{xml}: ")
    # Refused by OpenVINO's reader, where a later version checks dilations.
    assert "gives logits of shape (0, 10) for a batch of 1" in said or "OpenVINO can" in said


def test_the_child_process_reads_the_file_before_this_one(copy, monkeypatch):
    xml, weights = copy
    seen = []

    def child(data, what, runtime):
        seen.append((data, what, runtime))
        raise MobileNetError(f"{what}: refused in the child")

    monkeypatch.setattr(openvino_format, "verify_in_child", child)
    monkeypatch.setattr(openvino_format, "_core", None)  # OpenVINO must not read it here
    with pytest.raises(MobileNetError, match="refused in the child"):
        FMT.load(xml, LoadRequest())
    expected = openvino_format.ir_bytes(xml.read_bytes(), weights.read_bytes())
    assert seen == [(expected, str(xml), "openvino")]


def test_a_failed_export_leaves_nothing(tmp_path):
    model = random_model("mobilenet_v1_conv", RES, WIDTH)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    card = Trained(model, CLASSES, RES).model_card()
    with pytest.raises(MobileNetError) as error:
        FMT.export(model, tmp_path / "model.xml", RES, card)
    assert "outputs NaN or infinite values" in _one_line(error)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "model.bin").mkdir()  # the weights cannot be written: no .xml either
    model = random_model("mobilenet_v1_conv", RES, WIDTH)
    with pytest.raises(MobileNetError) as error:
        FMT.export(model, tmp_path / "model.xml", RES, card)
    assert "model.bin: it is a folder" in _one_line(error)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_export_takes_an_xml_name(tmp_path):
    model = random_model("mobilenet_v3_small", RES, WIDTH)
    with pytest.raises(MobileNetError) as error:
        FMT.export(model, tmp_path / "model.ir", RES, Trained(model, CLASSES, RES).model_card())
    assert "written as NAME.xml" in _one_line(error)


def test_a_missing_openvino_names_the_extra(ir, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MobileNetError) as error:
        FMT.load(ir[1], LoadRequest())
    assert 'needs openvino: pip install "mobilenet[openvino]"' in _one_line(error)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A small classifier's int8 IR calibrated on 16 digits, what quantize said, and the
    cache where it kept its verdict."""
    folder = tmp_path_factory.mktemp("openvino-int8")
    model = random_model("mobilenet_v3_small", RES, 0.5)
    request = QuantizeRequest(data="digits", out=folder / "int8.xml", images=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILENET_HOME", str(folder / "home"))
        said = FMT.quantize(Trained(model, CLASSES, RES), request)
    return folder / "int8.xml", said, folder / "home"


def test_int8_is_calibrated_and_checked_before_the_write(quantized, monkeypatch):
    path, said, home = quantized
    monkeypatch.setenv("MOBILENET_HOME", str(home))
    assert said.startswith("OpenVINO IR (weights in int8.bin) by NNCF (performance preset)")
    assert "calibrated on 16 images of digits" in said
    trained = FMT.load(path, LoadRequest())
    assert trained.model.engine == "openvino-int8"
    assert trained.card.precision == "int8"
    assert trained.card.quantization == {
        "method": "ptq",
        "scheme": f"nncf-{openvino_format.PRESET}",
        "calibration_images": 16,
    }
    assert (trained.classes, trained.resolution) == (CLASSES, RES)
    logits = trained.model(torch.randn(3, 3, RES, RES))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


@pytest.mark.slow  # a second NNCF run
def test_int8_far_from_its_reference_is_refused(tmp_path, monkeypatch):
    """Held to a reference without the quantization (every FakeQuantize removed), the
    int8 model is refused by the int8 rule, and nothing is written."""

    def unquantized(graph):
        graph = graph.clone()
        for op in graph.get_ordered_ops():
            if op.get_type_name() == "FakeQuantize":
                op.output(0).replace(op.input_value(0))
        return graph

    monkeypatch.setattr(openvino_format, "fake_quantized", unquantized)
    model = random_model("mobilenet_v3_small", RES, 0.5)
    request = QuantizeRequest(data="digits", out=tmp_path / "int8.xml", images=8)
    with pytest.raises(MobileNetError) as error:
        FMT.quantize(Trained(model, CLASSES, RES), request)
    assert "OpenVINO int8" in _one_line(error) and "nothing written" in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_nncf_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)
    model = random_model("mobilenet_v3_small", RES, WIDTH)
    request = QuantizeRequest(data="digits", out=tmp_path / "int8.xml", images=8)
    with pytest.raises(MobileNetError) as error:
        FMT.quantize(Trained(model, CLASSES, RES), request)
    assert 'needs nncf: pip install "mobilenet[openvino]"' in _one_line(error)


def test_engines_run_the_images(tmp_path):
    engines = {engine.name: engine for engine in FMT.engines()}
    assert set(engines) == {"openvino", "openvino-int8", "openvino-bf16"}
    assert engines["openvino"].predicts and not engines["openvino-int8"].predicts
    model = random_model("mobilenet_v3_small", RES, WIDTH)
    images = torch.randn(2, 3, RES, RES)
    setup = BenchSetup(model, images, RES, threads=1, tmp=tmp_path)
    out = engines["openvino"].build(setup)()
    with torch.no_grad():
        assert np.allclose(out[0], model(images).numpy(), atol=1e-4)
    case = BenchCase("mobilenet_v3_small")
    bf16 = engines["openvino-bf16"]
    if openvino_format.has_bf16():
        assert bf16.refuses(case) is None
        assert bf16.build(setup)()[0].shape == (2, 10)
    else:
        assert "openvino-bf16 needs a CPU with bf16" in bf16.refuses(case)
    assert "runs square classifiers only, not detection" in engines["openvino"].refuses(
        BenchCase("ssdlite_mobilenet_v3_large")
    )


@pytest.mark.slow  # a third NNCF run
def test_int8_engine_runs_the_images(tmp_path):
    engine = {e.name: e for e in FMT.engines()}["openvino-int8"]
    model = random_model("mobilenet_v3_small", RES, WIDTH)
    images = torch.randn(2, 3, RES, RES)
    calibration = lambda: iter([torch.randn(4, 3, RES, RES)])  # noqa: E731
    setup = BenchSetup(model, images, RES, threads=1, tmp=tmp_path, calibration=calibration)
    assert engine.build(setup)()[0].shape == (2, 10)
