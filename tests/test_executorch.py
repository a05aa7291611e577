"""ExecuTorch (.pte) export: checked by ExecuTorch's runtime against PyTorch, metadata kept
in the program, refusals in one line and without a partial file. Skipped where the
``mobile`` extra (executorch) is not installed."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from mobilenet import MobileNetError, create_model, save_weights
from mobilenet.cli import main
from mobilenet.export import executorch as et
from mobilenet.export.executorch import (
    MAX_BATCH,
    export_pte,
    read_pte,
    set_pte_threads,
)

from .helpers import randomize_bn, recalibrate_bn, unit_scale_logits

RES = 64


def _model(name: str, width_mult: float = 0.5):
    model = create_model(name, width_mult=width_mult, num_classes=10)
    model = recalibrate_bn(randomize_bn(model), resolution=RES)
    return unit_scale_logits(model, model.classifier, resolution=RES)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small"])
def test_export_matches_pytorch_and_keeps_metadata(name, tmp_path):
    model = _model(name)
    path = tmp_path / f"{name}.pte"
    classes = json.dumps(list("abcdefghij"))
    assert export_pte(model, path, RES, {"classes": classes}) <= 1e-4
    run, metadata = read_pte(path)
    assert metadata["resolution"] == str(RES)
    assert metadata["classes"] == classes
    assert json.loads(metadata["config"])["name"] == name
    assert metadata["max_batch"] == str(MAX_BATCH)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 5):  # 5: a batch size the export's check never ran
        x = torch.randn(batch, 3, RES, RES, generator=g)
        with torch.no_grad():
            expected = model(x)
        atol = 1e-4 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(run(x), expected, atol=atol, rtol=0)
    with pytest.raises(MobileNetError, match=f"batches of 1 to {MAX_BATCH}"):
        run(torch.randn(MAX_BATCH + 1, 3, RES, RES))


def test_thread_count_can_be_set():
    from executorch.extension.pybindings import portable_lib

    before = portable_lib._threadpool_get_thread_count()
    try:
        set_pte_threads(1)
        assert portable_lib._threadpool_get_thread_count() == 1
    finally:
        set_pte_threads(before)


def test_command_line_export(tmp_path, capsys):
    out = tmp_path / "m.pte"
    args = ["export", "--model", "mobilenet_v3_small", "--width-mult", "0.5"]
    assert main([*args, "--resolution", str(RES), "--format", "pte", "--out", str(out)]) == 0
    assert "ExecuTorch vs PyTorch" in capsys.readouterr().out
    assert read_pte(out)[1]["resolution"] == str(RES)


@pytest.mark.parametrize(
    "damage", [lambda d: b"", lambda d: b"not a program" * 8, lambda d: d[: len(d) // 2]]
)
def test_damaged_or_foreign_file_is_one_line(damage, tmp_path):
    good = tmp_path / "good.pte"
    export_pte(_model("mobilenet_v3_small"), good, RES)
    bad = tmp_path / "bad.pte"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(MobileNetError) as info:
        read_pte(bad)
    assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_program_without_our_metadata_is_refused(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    path = tmp_path / "foreign.pte"
    path.write_bytes(lowered.to_executorch().buffer)
    with pytest.raises(MobileNetError, match=r"not a \.pte file written by mobilenet export"):
        read_pte(path)


def test_refused_export_writes_nothing(tmp_path, monkeypatch):
    # A runtime that disagrees with PyTorch: the export is refused before the write.
    monkeypatch.setattr(et, "_run", lambda method, x: method(x).numpy() + 1.0)
    out = tmp_path / "refused.pte"
    with pytest.raises(MobileNetError, match="nothing written"):
        export_pte(_model("mobilenet_v3_small"), out, RES)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_is_one_line(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def import_module(name, package=None):
        if name == "executorch" or name.startswith("executorch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name="executorch")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    with pytest.raises(MobileNetError) as info:
        export_pte(_model("mobilenet_v3_small"), tmp_path / "m.pte", RES)
    assert str(info.value) == (
        'ExecuTorch export (.pte) needs executorch: pip install "mobilenet[mobile]"'
    )
    assert list(tmp_path.iterdir()) == []


CLASSES = list("abcdefghij")


def _weights(folder: Path, name: str = "mobilenet_v3_small", **kwargs) -> str:
    """Float weights of ``name`` (10 classes) that run at ``RES``."""
    metadata = {"classes": json.dumps(CLASSES), "resolution": str(RES)}
    return str(save_weights(_model(name, **kwargs), folder / "w.safetensors", metadata))


@pytest.fixture(scope="module")
def int8_pte(tmp_path_factory) -> tuple[Path, str]:
    """``mobilenet quantize --format pte`` of mobilenet_v3_small: the file and what it said."""
    folder = tmp_path_factory.mktemp("int8_pte")
    out = folder / "int8.pte"
    args = ["quantize", "--weights", _weights(folder), "--data", "digits", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert main([*args, "--calibration-images", "40"]) == 0
    return out, said.getvalue()


def test_quantize_to_pte_calibrates_on_the_data_and_checks_before_the_write(int8_pte):
    out, said = int8_pte
    assert "ExecuTorch program for XNNPACK, calibrated on 40 images of digits" in said
    run, metadata = read_pte(out)
    assert metadata["dtype"] == "int8" and metadata["calibration_images"] == "40"
    assert json.loads(metadata["classes"]) == CLASSES and metadata["resolution"] == str(RES)
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.pte", "w.safetensors"]
    assert run(torch.randn(2, 3, RES, RES)).shape == (2, 10)


def test_quantize_to_pte_refuses_what_it_would_ignore(tmp_path, capsys, monkeypatch):
    # The smallest network: the refusal after the lowering below is still a full export.
    weights = _weights(tmp_path, "mobilenet_v1_conv", width_mult=0.25)
    base = ["quantize", "--weights", weights, "--data", "digits"]
    refused = {
        ("--out", "m.pte", "--method", "qat"): "--method qat writes PyTorch int8 models",
        ("--out", "m.pte", "--epochs", "2"): "--epochs applies to --method qat, not ptq",
        ("--out", "m.pte", "--lr", "0.1"): "--lr applies to --method qat, not ptq",
        ("--format", "pte", "--out", "m.onnx"): "--format pte writes a .pte file, not m.onnx",
        ("--format", "pte", "--out", "m.bin"): "--format pte writes a .pte file, not m.bin",
        ("--format", "torch", "--out", "m.pte"): "--format torch writes a .safetensors file",
        ("--method", "qat", "--calibration-images", "8", "--out", "m.safetensors"): (
            "--calibration-images applies to --method ptq, not qat"
        ),
    }
    for flags, message in refused.items():
        flags = [str(tmp_path / f) if f.startswith("m.") else f for f in flags]
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # An int8 program further from the float model than PyTorch's own int8: not written.
    monkeypatch.setattr(et, "INT8_SLACK", -1.0)
    assert main([*base, "--calibration-images", "8", "--out", str(tmp_path / "m.pte")]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
