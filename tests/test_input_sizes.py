"""Non-square inputs (``--resolution 1024x2048``) in cost, memory, bench and export, and the
ONNX export of segmentation models, checked against PyTorch at a non-square size."""

import argparse
import json

import pytest
import torch

from mobilenet import create_model
from mobilenet.cli import main
from mobilenet.cli.args import resolution_hw
from mobilenet.cost import MAX_RESOLUTION
from mobilenet.export import export_onnx, onnx_session
from mobilenet.export.onnx import read_metadata

from .helpers import randomize_bn

HW = (64, 96)
ONNX = ["export", "--out", "x.onnx", "--model"]
PT2 = ["export", "--out", "x.pt2", "--format", "pt2", "--model"]


@pytest.mark.parametrize(
    ("text", "size"),
    [("512", 512), ("1024x2048", (1024, 2048)), (" 64 X 96 ", (64, 96)), ("0032", 32)],
)
def test_resolution_hw_reads_a_side_or_a_pair(text, size):
    assert resolution_hw(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "each side must be an integer >= 32"),
        ("31", ">= 32"),
        ("64x0", "each side must be"),
        (str(MAX_RESOLUTION + 1), f"<= {MAX_RESOLUTION}"),
        (f"64x{MAX_RESOLUTION * 10}", f"<= {MAX_RESOLUTION}"),
        ("9" * 5000, "each side must be"),  # beyond int()'s digit limit: still one line
        ("-64", "expected a size such as 512 or 1024x2048"),
        ("64x-96", "expected a size"),
        ("abc", "expected a size"),
        ("64x96x3", "expected a size"),
        ("64x", "expected a size"),
        ("64.5", "expected a size"),
        ("1e3", "expected a size"),
        ("", "expected a size"),
        ("\u0664\u0664", "expected a size"),  # digits of another script
    ],
)
def test_resolution_hw_refusals(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message) as error:
        resolution_hw(text)
    assert len(str(error.value)) < 200


def _refused(args: list[str], capsys) -> str:
    """The one error line of a command refused by argparse (exit 2) or by the command."""
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cost", "lraspp_mobilenet_v3_small", "--resolution", "1024x-1"], "expected a size"),
        (["memory", "mobilenet_v2", "--resolution", "0x64"], "each side must be"),
        (["bench", "lraspp_mobilenet_v3_small", "--resolution", "garbage"], "expected a size"),
        (
            ["bench", "mobilenet_v2", "--resolution", "64x96", "--save"],
            "--save records square sizes",
        ),
        (
            ["memory", "lraspp_mobilenet_v3_small", "--resolution", "100000x200000"],
            "100000x200000, batch 1",
        ),
        ([*PT2, "lraspp_mobilenet_v3_small"], "segmentation models export to --format onnx only"),
        ([*PT2, "mobilenet_v2", "--resolution", "64x96"], "--resolution HxW applies to --format"),
        ([*ONNX, "ssdlite_mobilenet_v3_small", "--resolution", "64x96"], "input is square"),
    ],
)
def test_commands_refuse_bad_sizes_in_one_line(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert message in _refused(args, capsys)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_cost_at_height_by_width(capsys):
    assert main(["cost", "lraspp_mobilenet_v3_large", "--resolution", "1024x2048", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resolution"] == [1024, 2048]
    assert out["largest_activation_bytes"] == 21 * 1024 * 2048 * 4  # the output logits
    assert main(["cost", "mobilenet_v2", "--resolution", "160x224"]) == 0
    assert " 160x224 " in capsys.readouterr().out


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_small", "deeplabv3_mobilenet_v3_large"])
def test_onnx_export_of_a_segmentation_model_at_a_non_square_size(name, tmp_path):
    kwargs = {"aux_loss": True} if name.startswith("deeplab") else {}
    model = randomize_bn(create_model(name, width_mult=0.5, **kwargs)).eval()
    path = tmp_path / "seg.onnx"
    diff = export_onnx(model, path, HW)
    session = onnx_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits"]  # "out" only, not "aux"
    x = torch.randn(2, 3, *HW, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)["out"]
    (logits,) = session.run(None, {"images": x.numpy()})
    assert logits.shape == (2, 21, *HW)
    assert expected.abs().max() > 0.1  # real signals, not zeros
    assert diff <= 1e-4 and (torch.from_numpy(logits) - expected).abs().max().item() <= 1e-4
    metadata = read_metadata(session)
    assert (metadata["task"], metadata["resolution"]) == ("segmentation", "64x96")
    assert json.loads(metadata["config"])["name"] == name


def test_export_cli_of_a_segmentation_model(tmp_path, capsys):
    out = tmp_path / "lraspp.onnx"
    args = ["export", "--model", "lraspp_mobilenet_v3_small", "--width-mult", "0.5"]
    assert main([*args, "--resolution", "64x96", "--out", str(out)]) == 0
    assert "at 64x96, dynamic batch" in capsys.readouterr().out
    session = onnx_session(out)
    assert session.get_inputs()[0].shape[1:] == [3, *HW]
    assert read_metadata(session)["task"] == "segmentation"
    square = tmp_path / "square.onnx"  # a classifier at one side: the metadata as before
    assert main(["export", "--model", "mobilenet_v3_small", "--out", str(square)]) == 0
    metadata = read_metadata(onnx_session(square))
    assert (metadata["resolution"], metadata["task"]) == ("224", "classification")


def test_bench_a_segmentation_model_at_height_by_width(capsys):
    args = ["bench", "lraspp_mobilenet_v3_small", "--width-mult", "0.5", "--resolution", "64x96"]
    args += ["--engines", "eager,eager-fused,onnxruntime", "--rounds", "1", "--iterations", "1"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resolution"] == [64, 96] and result["failed"] == {}
    assert [row["engine"] for row in result["engines"]] == ["eager", "eager-fused", "onnxruntime"]
