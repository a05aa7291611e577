"""The command line: tables, JSON, conversion, and one clear line for every bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from mobilenet import create_model, list_models
from mobilenet.cli import main

from .helpers import RealTensors, randomize_bn


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mobilenet", *args], capture_output=True, text=True, env=env
    )


def test_cost_json(capsys):
    assert main(["cost", "mobilenet_v2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "mobilenet_v2" and out["width_mult"] == 1.0
    assert out["resolution"] == 224
    assert out["params"] == 3_504_872
    assert round(out["madds"] / 1e6, 1) == 300.8
    assert out["peak_activation_bytes"] >= out["largest_activation_bytes"] > 0
    for kind in ("conv1x1", "depthwise", "conv", "linear"):
        assert set(out["by_type"][kind]) == {"params", "madds"}
    assert out["by_type"]["linear"]["madds"] == 1280 * 1000


def test_cost_options(capsys):
    args = ["cost", "mobilenet_v1", "--width-mult", "0.5", "--resolution", "160"]
    assert main([*args, "--num-classes", "10", "--per-layer", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["width_mult"], out["resolution"], out["num_classes"]) == (0.5, 160, 10)
    assert out["layers"][-1]["name"] == "classifier" and out["layers"][-1]["madds"] == 512 * 10
    assert main(["cost", "mobilenet_v1"]) == 0
    table = capsys.readouterr().out
    assert "4,231,976" in table and "568.7M" in table and "94.86%" in table


def test_cost_of_v4_at_each_models_own_resolution(capsys):
    # V4 Table 5: Conv-S at 224, Conv-M and Hybrid-M at 256, the large models at 384.
    own = {"conv_small": 224, "conv_medium": 256, "hybrid_medium": 256}
    own |= {"conv_large": 384, "hybrid_large": 384}
    assert main(["cost", "--all", "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    for variant, resolution in own.items():
        assert rows[f"mobilenet_v4_{variant}"]["resolution"] == resolution
    assert rows["mobilenet_v2"]["resolution"] == rows["mobilenet_v3_small"]["resolution"] == 224
    assert round(rows["mobilenet_v4_conv_medium"]["madds"] / 1e6, 1) == 1080.2
    assert main(["cost", "mobilenet_v4_conv_large"]) == 0
    line = capsys.readouterr().out.splitlines()[2]
    assert line.split()[:3] == ["mobilenet_v4_conv_large", "1", "384"] and "6,376.2M" in line
    assert main(["cost", "mobilenet_v4_conv_large", "--resolution", "224", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["resolution"] == 224  # as asked


def test_cost_all_computes_nothing(capsys):
    # Fast because nothing is computed: every model is measured on the meta device, which
    # is checked here instead of a clock, as a loaded test machine makes times meaningless.
    with RealTensors() as real:
        assert main(["cost", "--all"]) == 0
    assert real.elements == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert name in out
    result = run("cost", "--all")
    assert result.returncode == 0 and result.stdout == out


SCALES = ("--min-scale", "0.6", "--max-scale", "0.5")
BAD_INPUT = [
    (["cost", "mobilenet_v9"], "unknown model 'mobilenet_v9'"),
    (["cost", "mobilenet_v2", "--width-mult", "0"], "must be > 0"),
    (["cost", "mobilenet_v2", "--width-mult", "-0.5"], "must be > 0"),
    (["cost", "mobilenet_v2", "--resolution", "31"], ">= 32"),
    (["cost", "mobilenet_v2", "--resolution", "abc"], ">= 32"),
    (["cost"], "give a model name or --all"),
    (["cost", "ssdlite_mobilenet_v2", "--num-classes", "1"], "a detector needs num_classes >= 2"),
    (["cost", "mobilenet_v2", "--bogus"], "unrecognized arguments: --bogus"),
    (["detect", "train", "--data", "missing", "--out", "run", "--workers", "-1"], ">= 0"),
    (
        ["detect", "train", "--data", "missing", "--out", "run", *SCALES],
        "0 < min scale < max scale <= 1",
    ),
    (["detect", "train", "--data", "missing", "--out", "run", "--cache"], "augment light"),
    (["detect", "train", "--data", "no/such/folder", "--out", "run"], "data not found"),
    (["convert", "missing.pth", "out.safetensors", "--model", "mobilenet_v2"], "not found"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_gives_one_clear_message(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "message"), [BAD_INPUT[0], BAD_INPUT[-1]])
def test_bad_input_end_to_end_has_no_traceback(args, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mobilenet", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_convert_torchvision_checkpoint(tmp_path, capsys):
    ref = randomize_bn(torchvision.models.mobilenet_v3_small(num_classes=12)).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    dst = tmp_path / "small.safetensors"
    assert (
        main(["convert", str(tmp_path / "tv.pth"), str(dst), "--model", "mobilenet_v3_small"]) == 0
    )
    assert "12 classes" in capsys.readouterr().out
    model = create_model("mobilenet_v3_small", weights=str(dst)).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_convert_refuses_a_mismatch_and_writes_nothing(tmp_path, capsys):
    torch.save(torchvision.models.mobilenet_v2().state_dict(), tmp_path / "v2.pth")
    dst = tmp_path / "out.safetensors"
    args = ["convert", str(tmp_path / "v2.pth"), str(dst), "--model", "mobilenet_v2"]
    assert main([*args, "--width-mult", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "does not fit mobilenet_v2 (width 0.5" in err and "mis-shaped" in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "v2.pth"]


def test_warnings_are_one_line_each(tmp_path, capsys):
    from PIL import Image

    for cls in ("a", "b", "empty"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    for cls in ("a", "b"):
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    dst = tmp_path / "shards"
    assert main(["shards", str(tmp_path / "data"), str(dst), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"mobilenet shards: warning: {tmp_path / 'data'}: left out 1 class folder(s) without a "
        "readable image: empty"
    ]


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v3_large_minimal" in out and "mobilenet_v2.tv2_in1k" in out
