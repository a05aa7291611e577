"""Sizes that cannot fit: refused in one line before anything is allocated.

The cost model works on shapes alone (the meta device), so it answers for any size; the
commands that must allocate compare an estimate with the memory available first. Every
refusal is one line on stderr, exit status 2, and no file written.
"""

import argparse
import json

import pytest
import torch

import mobilenet.limits
from mobilenet import MobileNetError, cost, create_model
from mobilenet.cli import main
from mobilenet.cli.args import finite_float, positive_float, seed, width
from mobilenet.export.onnx import supported_opsets
from mobilenet.limits import (
    MAX_RESOLUTION,
    MAX_WIDTH_MULT,
    check_memory,
    estimate_memory,
    format_bytes,
    meta_model,
)
from mobilenet.weights import read_checkpoint, save_weights, sealed_safetensors

from .helpers import RealTensors

OPSETS = supported_opsets()
HUGE = "100000"  # 100000x100000 images: terabytes of activations on any model


def call(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:  # argparse's own errors
        return e.code


def forged_checkpoint(path, **config) -> str:
    """One of our files whose saved config says ``config``: a corrupt or hostile file."""
    model = create_model("mobilenet_v3_small", num_classes=4)
    save_weights(model, path, {"classes": json.dumps(["a", "b", "c", "d"])})
    state_dict, metadata = read_checkpoint(path)
    saved = {**json.loads(metadata["config"]), **config}
    # Sealed anew, as a crafted file would be: its config is what must be refused.
    path.write_bytes(sealed_safetensors(state_dict, {**metadata, "config": json.dumps(saved)}))
    return str(path)


# --------------------------------------------------------------------------- the cost model


def test_cost_allocates_no_real_tensor():
    model = create_model("mobilenet_v2").eval()
    with RealTensors() as real:
        c = cost(model, resolution=4096)
    assert real.elements == 0
    assert c.largest_activation_bytes == 2048 * 2048 * 96 * 4  # the first 6x expansion


def test_cost_at_any_resolution_is_instant():
    with RealTensors() as real:  # shapes only: instant on any machine, however busy
        c = cost("mobilenet_v2", resolution=100_000)
    assert real.elements == 0
    assert c.params == 3_504_872  # resolution changes MAdds and activations only
    assert c.largest_activation_bytes == 50_000 * 50_000 * 96 * 4


def test_cost_of_a_meta_model_equals_cost_of_the_real_one():
    real = cost(create_model("mobilenet_v3_small", width_mult=0.75), resolution=160)
    meta = cost(meta_model("mobilenet_v3_small", width_mult=0.75), resolution=160)
    assert meta.to_dict(per_layer=True) == real.to_dict(per_layer=True)


def test_cost_leaves_the_model_as_it_was():
    model = create_model("mobilenet_v1", width_mult=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cost(model, resolution=64)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cost_cli_at_100000_answers(capsys):
    with RealTensors() as real:
        assert main(["cost", "mobilenet_v2", "--resolution", HUGE, "--json"]) == 0
    assert real.elements == 0
    out = json.loads(capsys.readouterr().out)
    assert out["resolution"] == 100_000 and out["params"] == 3_504_872
    assert out["largest_activation_bytes"] == 50_000 * 50_000 * 96 * 4


def test_cost_cli_at_the_widest_width(capsys):
    args = ["cost", "mobilenet_v2", "--width-mult", str(MAX_WIDTH_MULT), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["width_mult"] == MAX_WIDTH_MULT


# --------------------------------------------------------------------------- the command line

EXPORT = ["export", "--model", "mobilenet_v3_small", "--out", "out.onnx"]
DETECTOR_EXPORT = ["export", "--model", "ssdlite_mobilenet_v3_small", "--out", "out.onnx"]
QUANTIZE = ["quantize", "--weights", "w.safetensors", "--data", "d", "--out", "out.onnx"]
BAD = [
    (["cost", "mobilenet_v2", "--width-mult", "1e9"], f"<= {MAX_WIDTH_MULT:g}"),
    (["cost", "mobilenet_v2", "--width-mult", "101"], f"<= {MAX_WIDTH_MULT:g}"),
    (["cost", "mobilenet_v2", "--width-mult", "inf"], "must be a finite number"),
    (["cost", "mobilenet_v2", "--width-mult", "nan"], "must be a finite number"),
    (["cost", "mobilenet_v2", "--resolution", str(MAX_RESOLUTION + 1)], f"<= {MAX_RESOLUTION}"),
    (["memory", "mobilenet_v2", "--resolution", HUGE], "the comparison would need about"),
    (["memory", "mobilenet_v2", "--width-mult", "nan"], "must be a finite number"),
    (["bench", "mobilenet_v2", "--resolution", HUGE, "--engines", "eager"], "would need about"),
    (["bench", "mobilenet_v2", "--width-mult", "inf"], "must be a finite number"),
    ([*EXPORT, "--resolution", HUGE], "the export would need about"),
    ([*EXPORT, "--width-mult", "1e9"], f"<= {MAX_WIDTH_MULT:g}"),
    ([*DETECTOR_EXPORT, "--resolution", HUGE], "the export would need about"),
    ([*EXPORT, "--opset", "99"], f"choose {OPSETS.start} to {OPSETS.stop - 1}"),
    ([*EXPORT, "--opset", "0"], "not supported by the installed exporter"),
    ([*EXPORT, "--opset", "5"], "not supported by the installed exporter"),
    ([*EXPORT, "--opset", "1.5"], "not an integer"),
    ([*EXPORT, "--format", "torchscript", "--opset", "17"], "--opset applies to --format onnx"),
    ([*QUANTIZE, "--lr", "nan"], "must be a finite number"),
    ([*QUANTIZE, "--lr=-inf"], "must be a finite number"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sizes_give_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with RealTensors() as real:
        assert call(args) == 2
    assert real.elements == 0  # refused, not attempted
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(f"mobilenet {args[0]}: error: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"width_mult": 1e9}, "width multiplier must be a finite number"),
        ({"width_mult": float("inf")}, "width multiplier must be a finite number"),
        ({"width_mult": float("nan")}, "width multiplier must be a finite number"),
        ({"width_mult": "wide"}, "width multiplier must be a finite number"),
        ({"num_classes": -3}, "num_classes must be a non-negative integer"),
        ({"num_classes": 10**12}, "would need"),
    ],
)
@pytest.mark.parametrize("command", ["convert", "export", "eval", "predict"])
def test_absurd_config_in_a_checkpoint(command, config, message, tmp_path, monkeypatch, capsys):
    weights = forged_checkpoint(tmp_path / "forged.safetensors", **config)
    monkeypatch.chdir(tmp_path)
    args = {
        "convert": ["convert", weights, "out.safetensors", "--model", "mobilenet_v3_small"],
        "export": ["export", "--model", "mobilenet_v3_small", "--weights", weights, "--out",
                   "out.onnx"],
        "eval": ["eval", "--weights", weights, "--data", "digits"],
        "predict": ["predict", "image.png", "--weights", weights],
    }[command]  # fmt: skip
    assert call(args) == 2
    err = capsys.readouterr().err
    assert message in err and "forged.safetensors" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.safetensors"]


def test_the_export_check_runs_at_every_size(tmp_path, monkeypatch, capsys):
    # A machine with 1 KiB free: the refusal names both sizes, and nothing is written.
    monkeypatch.setattr(mobilenet.limits, "available_memory", lambda device=None: 1024)
    monkeypatch.chdir(tmp_path)
    assert call([*EXPORT, "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "more than the 1.0 KiB available" in err and "64x64, batch 3" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_before_starting_a_process(monkeypatch):
    from mobilenet import bench

    def no_process(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr("subprocess.Popen", no_process)
    cfg = bench.BenchConfig("mobilenet_v2", resolution=100_000)
    with pytest.raises(MobileNetError, match="in 2 processes"):
        bench.run_bench(cfg, ["eager", "eager-fused"])


def test_memory_report_refuses_a_huge_batch():
    from mobilenet.memory import memory_report

    with pytest.raises(MobileNetError, match="the comparison would need"):
        memory_report("mobilenet_v3_small", resolution=224, batch=10**9)


# ----------------------------------------------------------------------- export: the file's width


def test_export_reads_the_width_and_classes_of_the_file(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from mobilenet.classification.predict import load_trained

    model = create_model("mobilenet_v3_small", width_mult=0.5, num_classes=3)
    weights = tmp_path / "best.safetensors"
    save_weights(model, weights, {"classes": json.dumps(["cat", "dog", "owl"])})
    out = tmp_path / "model.onnx"
    args = ["export", "--model", "mobilenet_v3_small", "--weights", str(weights), "--out"]
    assert main([*args, str(out), "--resolution", "64"]) == 0
    exported = load_trained(str(out))
    assert exported.model.config.width_mult == 0.5
    assert exported.classes == ["cat", "dog", "owl"]
    assert "mobilenet_v3_small at 64x64" in capsys.readouterr().out


def test_export_refuses_num_classes_that_contradict_the_weights(tmp_path, capsys):
    weights = tmp_path / "best.safetensors"
    save_weights(create_model("mobilenet_v3_small", num_classes=3), weights)
    args = ["export", "--model", "mobilenet_v3_small", "--weights", str(weights)]
    assert main([*args, "--out", str(tmp_path / "m.onnx"), "--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert f"--num-classes 5 contradicts {weights}, which holds 3 classes" in err
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- argument types


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "abc", ""])
def test_finite_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        finite_float(text)


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("-2.5", -2.5), ("1e-3", 1e-3)])
def test_finite_float_accepts(text, value):
    assert finite_float(text) == value


@pytest.mark.parametrize("text", ["nan", "inf", "0", "-1", "-0.0"])
def test_positive_float_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float(text)


@pytest.mark.parametrize("text", ["nan", "inf", "0", "1e9", "100.5"])
def test_width_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        width(text)


@pytest.mark.parametrize("text", ["-1", str(2**32), "1.5", "1e3", "seven", "nan"])
def test_seed_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        seed(text)


@pytest.mark.parametrize("text", ["0", "42", str(2**32 - 1)])
def test_seed_accepts(text):
    assert seed(text) == int(text)


def test_opsets_include_the_default():
    from mobilenet.export.onnx import DEFAULT_OPSET

    assert DEFAULT_OPSET in OPSETS and OPSETS.start >= 7


# --------------------------------------------------------------------------- the API


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e9, 0, -1, True, "1"])
def test_create_model_refuses_an_absurd_width(value):
    with pytest.raises(MobileNetError, match="width multiplier"):
        create_model("mobilenet_v2", width_mult=value)


def test_estimate_counts_weights_not_yet_in_memory():
    meta = meta_model("mobilenet_v2")
    real = create_model("mobilenet_v2")
    weights = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    assert estimate_memory(meta, 224).weights == weights
    assert estimate_memory(real, 224).weights == 0  # already allocated
    peak = cost(real).peak_activation_bytes
    assert estimate_memory(real, 224, batch=8).activations == 8 * peak
    training = estimate_memory(meta, 224, batch=2, training=True)
    assert training.activations > 2 * peak  # every activation kept for the backward pass
    assert training.weights > 3 * weights


def test_check_memory_skips_where_the_system_does_not_say(monkeypatch):
    monkeypatch.setattr(mobilenet.limits, "available_memory", lambda device=None: None)
    assert check_memory(meta_model("mobilenet_v2"), 100_000).total > 2**40


def test_available_memory_reads_proc_meminfo():
    available = mobilenet.limits.available_memory()
    assert available is None or available > 0


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(512, "512 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB"), (5 * 2**60, "5.0 EiB")],
)
def test_format_bytes(nbytes, text):
    assert format_bytes(nbytes) == text
