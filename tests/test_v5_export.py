"""MobileNetV5's encoder to the phone: float and int8 ``.onnx``, ``.pte`` and ``.tflite``
files of ``mobilenet_v5_300m_enc``, each checked by its runtime against PyTorch before the
write; the card says ``encoder``; ``eval`` and ``predict`` refuse such a file in one line.

The encoder's graph (80 blocks: 33 attention blocks, ~150 RMS norms, ~130 tanh-GELUs) takes
ExecuTorch minutes to lower and LiteRT one to two to convert at any width, so every test
that writes a phone file is ``slow``. Float files at width 0.25 and 256 (37.8M parameters:
the fusion adapter's 2048 channels and the attention heads are not scaled); int8 files at
width 0.05 and 64 (5.8M), calibrated on ``digits``. Weights are random, with random norm
scales, layer scales and biases, so every tensor shows in the output.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mobilenet import create_model, save_weights
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.export.check import check_against_pytorch
from mobilenet.export.int8_check import int8_agreement
from mobilenet.export.prepare import (
    ChannelMeanRmsNorm2d,
    ConcatSamePad,
    MatmulAttention,
    TanhFormulaGELU,
    delegable_forms,
)
from mobilenet.formats import QuantizeRequest, format_named
from mobilenet.layers import DotProductAttention, GELUTanh, RmsNorm2d, SamePad
from mobilenet.models.mobilenet_v5 import V5_300M, build_v5

from .helpers import randomize_v5

ENCODER = "mobilenet_v5_300m_enc"
WIDTH, RES = 0.25, 256  # float files
INT8_WIDTH, INT8_RES = 0.05, 64  # int8 files
SUFFIX = {"onnx": ".onnx", "pte": ".pte", "tflite": ".tflite"}


# One row of each kind in each stage, from the 300M's table: every block the encoder has
# (fused IB; UIB ExtraDW, ConvNext and FFN; Mobile MQA with and without key/value
# downsampling; the fusion adapter) in a graph ExecuTorch quantizes and lowers in a minute
# or two (at the whole depth, 80 blocks, it takes it tens of minutes on 2 cores).
SHALLOW_ROWS = (0, 3, 4, 8, 16, 17, 18, 45, 46, 47)


def _encoder(width: float, seed: int = 0, shallow: bool = False) -> nn.Module:
    """The encoder (``shallow``: its :data:`SHALLOW_ROWS` only) with random weights, norm
    scales, layer scales and biases."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if shallow:
            rows = tuple(V5_300M.rows[i] for i in SHALLOW_ROWS)
            model = build_v5(ENCODER, V5_300M._replace(rows=rows), width, 0, 0.0, encoder=True)
        else:
            model = create_model(ENCODER, width_mult=width)
    return randomize_v5(model, seed)


def _weights(folder: Path, width: float) -> str:
    return str(save_weights(_encoder(width), folder / f"enc{width}.safetensors"))


def _run_file(path: Path):
    """A runner of the file (float images in, the map out) and its metadata."""
    if path.suffix == ".onnx":
        from mobilenet.export.onnx import onnx_session, read_metadata

        session = onnx_session(path)
        return (
            lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
            read_metadata(session),
        )
    if path.suffix == ".pte":
        from mobilenet.export.executorch import read_pte

        return read_pte(path)
    from mobilenet.export.litert import read_tflite

    return read_tflite(path, threads=1)


def _refusals(path: Path, capsys, tmp_path: Path) -> list[str]:
    """What eval and predict say of ``path``: one line each, exit status 2."""
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    said, _ = [], capsys.readouterr()
    for command in (["eval", "--data", "digits"], ["predict", str(image)]):
        assert main([*command, "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"mobilenet {command[0]}: error: "), err
        said.append(err)
    return said


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min())


# --------------------------------------------------------------------------- quick


def test_delegable_forms_compute_the_same_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 9, 7, generator=g) * 3
    norm = RmsNorm2d(24)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g) + 0.5)
    pairs = [
        (norm, ChannelMeanRmsNorm2d(norm)),
        (GELUTanh(), TanhFormulaGELU()),
        (SamePad(3, 2), ConcatSamePad(SamePad(3, 2))),  # 9x7: one row and column after
        (SamePad(5, 1), ConcatSamePad(SamePad(5, 1))),  # two on every side
    ]
    for original, form in pairs:
        with torch.no_grad():
            expected, actual = original(x), form(x)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max())
    # multi-query (one key/value head) and multi-head attention, keys fewer than queries
    q = torch.randn(2, 4, 63, 16, generator=g)
    for heads in (1, 4):
        k, v = torch.randn(2, heads, 16, 16, generator=g), torch.randn(2, heads, 16, 8, generator=g)
        expected = DotProductAttention()(q, k, v)
        torch.testing.assert_close(MatmulAttention()(q, k, v), expected, rtol=0, atol=1e-5)
    model = delegable_forms(nn.Sequential(RmsNorm2d(8), GELUTanh(), nn.Sequential(norm)))
    assert [type(m) for m in model[:2]] == [ChannelMeanRmsNorm2d, TanhFormulaGELU]
    assert isinstance(model[2][0], ChannelMeanRmsNorm2d)  # nested modules too
    kept = delegable_forms(nn.Sequential(RmsNorm2d(8), GELUTanh(), SamePad(3, 2)), False, False)
    assert [type(m) for m in kept] == [RmsNorm2d, GELUTanh, SamePad]
    padded = delegable_forms(nn.Sequential(SamePad(3, 2)), pads=True)
    assert isinstance(padded[0], ConcatSamePad)


def test_unsqueeze_is_exported_as_a_view_xnnpack_lowers():
    pytest.importorskip("executorch")
    from mobilenet.export.executorch import unsqueeze_as_view

    class Heads(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2).unsqueeze(1) * 2

    x = torch.randn(1, 4, 3, 5)
    program = unsqueeze_as_view(torch.export.export(Heads(), (x,)))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.unsqueeze.default not in targets
    assert torch.ops.aten.view.default in targets
    torch.testing.assert_close(program.module()(x), Heads()(x))


class _Features(nn.Module):
    """Features of scale 0.01 (no classes), or logits (10 classes) of the same values."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x):
        return x[:, :1].mean((2, 3), keepdim=True).expand(-1, 4, 2, 2) * 0.01 + 0.01


def test_the_float_check_holds_features_to_their_own_scale():
    # 2e-4 relative: nothing for logits of scale 1 (floor 1: 1e-4 absolute passes 2e-6),
    # a tenth of a percent off for features, whose scale is their own.
    def off(model):
        return lambda x: (model(x) * (1 + 2e-4)).numpy()

    assert check_against_pytorch(off(_Features(10)), _Features(10), 8, "R") < 1e-4
    with pytest.raises(MobileNetError, match=r"^R differs from PyTorch by .*nothing written$"):
        check_against_pytorch(off(_Features(0)), _Features(0), 8, "R")


def test_the_int8_rule_judges_a_map_by_its_distance():
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(3, 32, 4, 4, generator=g)
    reference = exact + 0.1 * torch.randn(exact.shape, generator=g)
    close = reference + 0.05 * torch.randn(exact.shape, generator=g)
    sensitivity = 0.05
    fine = int8_agreement(close, reference, exact, sensitivity, scores=False)
    assert fine.refusal("ExecuTorch") is None and fine.top1_gap == 0.0
    # channels exchanged at every position: far from the reference, refused
    swapped = reference.roll(1, dims=1)
    reason = int8_agreement(swapped, reference, exact, sensitivity, scores=False).refusal("LiteRT")
    assert reason is not None and "of the output's spread (RMS)" in reason
    # class scores per pixel (a segmentation map): the first class kept at every position
    scored = int8_agreement(close, reference, exact, sensitivity, scores=True)
    assert 0 <= scored.top1_image < 3 and 0 <= scored.top1_class < 32


# 64: the fusion adapter resizes its 4x4 map up to 16x16; 512: it average-pools its
# 32x32 map by 2, the path of Gemma 3n's 768 (a window the export must keep constant).
@pytest.mark.parametrize("res", [64, 512])
def test_encoder_onnx_file_says_encoder_and_eval_predict_refuse_it(res, tmp_path, capsys):
    out = tmp_path / "enc.onnx"
    args = ["export", "--model", ENCODER, "--width-mult", "0.05", "--resolution", str(res)]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"wrote {out}: {ENCODER} at {res}x{res}" in said
    run, metadata = _run_file(out)
    assert metadata["task"] == "encoder" and metadata["resolution"] == str(res)
    config = json.loads(metadata["config"])
    assert config["name"] == ENCODER and config["num_classes"] == 0
    assert run(torch.zeros(1, 3, res, res)).shape == (1, 2048, 16, 16)
    for line in _refusals(out, capsys, tmp_path):
        assert f"{out} is an encoder: its output is a feature map, not class scores" in line


def test_quantize_takes_an_encoder_to_the_formats_that_read_it_only(tmp_path, capsys):
    # An int8 PyTorch file (the default for a .safetensors) has no reader of encoders.
    out = str(tmp_path / "enc.int8.safetensors")
    args = ["quantize", "--weights", _weights(tmp_path, 0.05), "--data", "digits", "--out", out]
    assert main(args) == 2
    err = capsys.readouterr().err
    said = "encoder models quantize to --format onnx or --format pte or --format tflite only"
    assert err.count("\n") == 1 and said in err, err
    run = str(tmp_path / "run")
    assert main(["train", "--model", ENCODER, "--data", "digits", "--out", run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is an encoder: it has no loss of its own" in err, err


# --------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def float_weights(tmp_path_factory) -> str:
    return _weights(tmp_path_factory.mktemp("v5_float"), WIDTH)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pte", "tflite"])
def test_float_encoder_file_matches_pytorch(fmt, float_weights, tmp_path, capsys):
    out = tmp_path / f"enc{SUFFIX[fmt]}"
    args = ["export", "--weights", float_weights, "--resolution", str(RES), "--format", fmt]
    assert main([*args, "--out", str(out)]) == 0, capsys.readouterr().err
    assert f"wrote {out}: {ENCODER} at {RES}x{RES}" in capsys.readouterr().out
    run, metadata = _run_file(out)
    assert metadata["task"] == "encoder" and json.loads(metadata["config"])["num_classes"] == 0
    assert json.loads(metadata["preprocess"])["resolution"] == RES
    model = _encoder(WIDTH)
    x = torch.randn(1, 3, RES, RES, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(x)
    actual = run(x)
    assert actual.shape == (1, 2048, 16, 16)
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 1e-3 * scale
    assert _cosine(actual, expected) > 1 - 1e-6
    _check_refusals(out, capsys, tmp_path)


def _check_refusals(out: Path, capsys, tmp_path: Path) -> None:
    for line in _refusals(out, capsys, tmp_path):
        assert "is an encoder: its output is a feature map, not class scores" in line


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "pte", "tflite"])
def test_int8_encoder_file_passes_the_int8_check(fmt, tmp_path, capsys):
    """The format's quantize (what ``mobilenet quantize --format onnx|pte|tflite`` runs)
    on the shallow encoder, calibrated on digits. pte and tflite: the exporter's own check
    (the int8 rule for maps, against the quantized PyTorch reference) passed before the
    write. onnx: as for every int8 ONNX file, the session eval would run (this CPU's int8
    kernels where they agree) is held to the file's QDQ graph by the same rule."""
    from mobilenet.deployed import Trained

    model = _encoder(INT8_WIDTH, shallow=True)
    out = tmp_path / f"enc.int8{SUFFIX[fmt]}"
    request = QuantizeRequest(data="digits", out=out, images=16, progress=lambda _: None)
    format_named(fmt).quantize(Trained(model, [], INT8_RES), request)
    run, metadata = _run_file(out)
    assert metadata["task"] == "encoder"
    assert "int8" in (metadata.get("dtype"), metadata.get("precision"))
    if fmt == "onnx":
        run = _agreeing_int8_session(out)
    images = torch.rand(3, 3, INT8_RES, INT8_RES, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images)
    actual = torch.cat([run(x) for x in images.split(1)])
    assert actual.shape == expected.shape == (3, 2048, 16, 16)
    # Random weights: int8 rounding moves the map a lot, but it stays the float map's.
    assert _cosine(actual, expected) > 0.5
    _check_refusals(out, capsys, tmp_path)


def _agreeing_int8_session(path: Path):
    """A runner of the session eval would run on an int8 ONNX file, checked to be within
    the int8 rule of the file's QDQ graph run in float32."""
    from mobilenet.export.onnx import onnx_session
    from mobilenet.export.onnx_int8 import kernel_agreement, probe_images, runnable_int8_session

    qdq = onnx_session(path, qdq_in_float=True)
    size, plain = (INT8_RES, INT8_RES), {"mean": (0.0,) * 3, "std": (1.0,) * 3}
    chosen = runnable_int8_session(path, onnx_session(path), size, scores=False, **plain)
    agreement = kernel_agreement(chosen, qdq, probe_images(size, **plain), scores=False)
    assert agreement.refusal("ONNX Runtime") is None
    return lambda x: torch.from_numpy(chosen.run(None, {"images": x.numpy()})[0])
