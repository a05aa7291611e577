"""ExecuTorch (.pte) export, float and int8: checked by ExecuTorch's runtime against PyTorch,
metadata kept in the program, run by eval, predict and bench, refusals in one line and
without a partial file. Skipped where the ``mobile`` extra (executorch) is not installed."""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from mobilenet import MobileNetError, save_weights
from mobilenet.classification.predict import load_trained
from mobilenet.cli import main
from mobilenet.export import executorch as et
from mobilenet.export.executorch import (
    MAX_BATCH,
    export_pte,
    read_pte,
    set_pte_threads,
)
from mobilenet.formats.executorch import PteModel

from .helpers import cli_json, noise_image, paper_models, random_model

RES = 64


def _model(name: str, width_mult: float = 0.5):
    return random_model(name, RES, width_mult)


@pytest.mark.parametrize("name", paper_models())
def test_every_classifier_exports_and_matches_pytorch(name, tmp_path):
    model = _model(name)
    path = tmp_path / f"{name}.pte"
    classes = json.dumps(list("abcdefghij"))
    assert export_pte(model, path, RES, {"classes": classes}) <= 1e-4
    run, metadata = read_pte(path)
    assert metadata["resolution"] == str(RES)
    assert metadata["classes"] == classes
    assert json.loads(metadata["config"])["name"] == name
    assert metadata["max_batch"] == "1"  # ExecuTorch's recipe: a static batch of one
    x = torch.randn(1, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    atol = 1e-4 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(run(x), expected, atol=atol, rtol=0)
    with pytest.raises(MobileNetError, match="takes batches of one image"):
        run(torch.randn(2, 3, RES, RES))


def test_a_batch_range_program_runs_every_batch_within_its_bound(tmp_path):
    model = _model("mobilenet_v3_small")
    path = tmp_path / "range.pte"
    assert export_pte(model, path, RES, max_batch=MAX_BATCH) <= 1e-4
    run, metadata = read_pte(path)
    assert metadata["max_batch"] == str(MAX_BATCH)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3, 5):  # 5: a batch size the export's check never ran
        x = torch.randn(batch, 3, RES, RES, generator=g)
        with torch.no_grad():
            expected = model(x)
        atol = 1e-4 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(run(x), expected, atol=atol, rtol=0)
    with pytest.raises(MobileNetError, match=f"batches of 1 to {MAX_BATCH}"):
        run(torch.randn(MAX_BATCH + 1, 3, RES, RES))


@pytest.mark.parametrize("bound", [0, MAX_BATCH + 1, 2.0])
def test_a_batch_bound_outside_what_a_program_holds_is_one_line(bound, tmp_path):
    with pytest.raises(MobileNetError) as caught:
        export_pte(_model("mobilenet_v1_conv", 0.25), tmp_path / "m.pte", RES, max_batch=bound)
    assert "\n" not in str(caught.value) and list(tmp_path.iterdir()) == []


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


def _one_line_refusals(path: Path, image: Path, capsys) -> str:
    """What eval and predict say of ``path``: one line each, the same, with exit status 2."""
    said, _ = [], capsys.readouterr()  # not what came before
    for command in (["eval", "--data", "digits"], ["predict", str(image)]):
        assert main([*command, "--weights", str(path)]) == 2
        err = capsys.readouterr().err
        prefix = f"mobilenet {command[0]}: error: "
        assert err.count("\n") == 1 and err.startswith(prefix), err
        said.append(err.removeprefix(prefix))
    assert said[0] == said[1] and str(path) in said[0]
    return said[0]


def test_damaged_foreign_or_misnamed_files_are_one_line(tmp_path, capsys):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from PIL import Image

    good = tmp_path / "good.pte"
    export_pte(_model("mobilenet_v1_conv", width_mult=0.25), good, RES)
    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    loads = "not a program ExecuTorch can load"
    damaged = {
        "empty": (b"", loads),
        "text": (b"not a program" * 8, loads),
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "damaged: its bytes"),
        "safetensors": (
            Path(_weights(tmp_path, "mobilenet_v1_conv", width_mult=0.25)).read_bytes(),
            loads,
        ),
    }
    for name, (data, message) in damaged.items():
        bad = tmp_path / f"{name}.pte"
        bad.write_bytes(data)
        with pytest.raises(MobileNetError) as info:
            read_pte(bad)
        assert "\n" not in str(info.value) and str(bad) in str(info.value)
        assert message in _one_line_refusals(bad, image, capsys)
    # An ExecuTorch program of another kind: without our metadata.
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    foreign = tmp_path / "foreign.pte"
    foreign.write_bytes(lowered.to_executorch().buffer)
    with pytest.raises(MobileNetError, match=r"not a \.pte file written by mobilenet export"):
        read_pte(foreign)
    assert "not a .pte file written by mobilenet export" in _one_line_refusals(
        foreign, image, capsys
    )
    # An engine predict does not know: refused by the parser, in one line.
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--weights", str(good), str(image), "--engine", "tensorrt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'tensorrt'" in err


def test_refused_export_writes_nothing(tmp_path, monkeypatch):
    # A runtime that disagrees with PyTorch: the export is refused before the write.
    monkeypatch.setattr(et, "_run", lambda method, x: method(x).numpy() + 1.0)
    out = tmp_path / "refused.pte"
    with pytest.raises(MobileNetError, match="nothing written"):
        export_pte(_model("mobilenet_v1_conv", width_mult=0.25), out, RES)
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
    # The preprocessing it was calibrated with, which eval and predict then use.
    assert json.loads(metadata["preprocess"])["resolution"] == RES
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.pte", "w.safetensors"]
    assert run(torch.randn(1, 3, RES, RES)).shape == (1, 10)


def test_quantize_to_pte_refuses_what_it_would_ignore(tmp_path, capsys, monkeypatch):
    # The smallest network: the refusal after the lowering below is still a full export.
    weights = _weights(tmp_path, "mobilenet_v1_conv", width_mult=0.25)
    base = ["quantize", "--weights", weights, "--data", "digits"]
    refused = {
        ("--out", "m.pte", "--method", "qat"): "--method qat writes torch int8 models",
        ("--out", "m.pte", "--epochs", "2"): "--epochs applies to --method qat, not ptq",
        ("--out", "m.pte", "--lr", "0.1"): "--lr applies to --method qat, not ptq",
        ("--format", "pte", "--out", "m.onnx"): "--format pte writes a .pte file, not m.onnx",
        ("--format", "pte", "--out", "m.bin"): "--format pte writes a .pte file, not m.bin",
        ("--format", "torch", "--out", "m.pte"): "--format torch writes a .safetensors file",
        ("--integer-only", "--out", "m.tflite"): "--integer-only applies to --format onnx and pte",
        (
            "--integer-only",
            "--out",
            "m.pt",
        ): "--integer-only applies to --format onnx and pte, not torch",
        ("--method", "qat", "--calibration-images", "8", "--out", "m.safetensors"): (
            "--calibration-images applies to --method ptq, not qat"
        ),
    }
    for flags, message in refused.items():
        flags = [str(tmp_path / f) if f.startswith("m.") else f for f in flags]
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # An int8 program further from its PyTorch int8 reference than allowed: not written.
    monkeypatch.setattr(et, "INT8_SLACK", -1.0)
    assert main([*base, "--calibration-images", "8", "--out", str(tmp_path / "m.pte")]) == 2
    assert "nothing written" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_predict_engine_executorch_then_eval_of_its_pte(tmp_path, capsys, monkeypatch):
    weights, image = _weights(tmp_path), noise_image(tmp_path)
    common = ["predict", "--weights", weights, str(image)]
    (eager,) = cli_json(capsys, *common, "--engine", "eager")
    (first,) = cli_json(capsys, *common, "--engine", "executorch")
    (cached,) = (Path(os.environ["MOBILENET_HOME"]) / "pte").iterdir()
    monkeypatch.setattr(et, "export_pte", None)  # the second run must not export again
    (second,) = cli_json(capsys, *common, "--engine", "executorch")
    assert first["engine"] == second["engine"] == "executorch"
    for result in (first, second):
        assert [t["class"] for t in result["top"]] == [t["class"] for t in eager["top"]]
        for ours, theirs in zip(result["top"], eager["top"], strict=True):
            assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
    # The cached program is a .pte like any other: eval gives the float model's figures
    # (batches of 64 run in slices of the program's batch).
    results = [
        cli_json(capsys, "eval", "--weights", w, "--data", "digits") for w in (weights, str(cached))
    ]
    assert results[0]["images"] == results[1]["images"] == 297
    assert results[0]["top1"] == results[1]["top1"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], abs=1e-4)
    trained = load_trained(str(cached))
    assert isinstance(trained.model, PteModel) and trained.model.precision == "float32"
    assert trained.classes == CLASSES and trained.resolution == RES
    with pytest.raises(MobileNetError, match=f"takes \\(batch, 3, {RES}, {RES}\\)"):
        trained.model(torch.randn(1, 3, RES + 8, RES + 8))
    with pytest.raises(MobileNetError, match=f"takes {RES}x{RES} images, not 32"):
        load_trained(str(cached), resolution=32)
    with pytest.raises(MobileNetError, match="holds mobilenet_v3_small, not mobilenet_v2"):
        load_trained(str(cached), "mobilenet_v2")


def test_eval_and_predict_of_an_int8_pte_on_its_own_engine(int8_pte, capsys):
    from executorch.extension.pybindings import portable_lib

    out, _ = int8_pte
    image = noise_image(out.parent)
    metrics = cli_json(capsys, "eval", "--weights", str(out), "--data", "digits")
    assert metrics["images"] == 297 and 0 <= metrics["top1"] <= 100
    (result,) = cli_json(capsys, "predict", "--weights", str(out), str(image))
    assert result["engine"] == "executorch-int8" and result["top"][0]["class"] in CLASSES
    assert main(["predict", "--weights", str(out), str(image), "--engine", "executorch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs on its own engine, executorch-int8: not executorch" in err
    # Loaded on PyTorch's thread count (one in the tests), whatever the pool had before.
    set_pte_threads(3)
    int8 = load_trained(str(out)).model
    assert portable_lib._threadpool_get_thread_count() == torch.get_num_threads() == 1
    # Quantized, it still follows the float network's function on images like those it
    # was calibrated on (held-out digits); a random network of fifty layers at int8 is
    # no closer than this (accuracy is measured on trained models: benchmarks/).
    from mobilenet.data import builtin_splits, eval_transform

    float_model = load_trained(str(out.parent / "w.safetensors")).model
    transform = eval_transform(RES, float_model.eval_config)
    digits = builtin_splits("digits", transform, transform).val
    x = torch.stack([digits[i][0] for i in range(10)])
    with torch.no_grad():
        reference = float_model(x)
    correlation = torch.corrcoef(torch.stack([int8(x).flatten(), reference.flatten()]))[0, 1]
    assert correlation > 0.8


def test_integer_activations_compute_the_same_function():
    from mobilenet.export.prepare import integer_activations, prepare_for_inference

    model = _model("mobilenet_v3_small")
    prepared = prepare_for_inference(model, channels_last=False)
    x = torch.randn(2, 3, RES, RES)
    with torch.no_grad():
        expected = prepared(x)
        swapped = integer_activations(prepared)
        kinds = {type(m).__name__ for m in swapped.modules()}
        assert "Hardswish" not in kinds and "Hardsigmoid" not in kinds
        assert {"IntegerHardswish", "IntegerHardsigmoid"} <= kinds
        torch.testing.assert_close(swapped(x), expected, rtol=0, atol=1e-4)


def _unquantized_operators(model, integer_only: bool) -> set[str]:
    """The operators XNNPACK's quantizer leaves in float (no quantization annotation)."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from mobilenet.export.prepare import integer_activations, prepare_for_inference

    prepared = prepare_for_inference(model, channels_last=False)
    if integer_only:
        integer_activations(prepared)
    captured = torch.export.export(prepared, (torch.randn(2, 3, RES, RES),)).module()
    observed = prepare_pt2e(captured, et.xnnpack_quantizer())
    return {
        str(node.target)
        for node in observed.graph.nodes
        if node.op == "call_function"
        and not getattr(node.meta.get("quantization_annotation"), "_annotated", False)
    }


def test_integer_only_quantizes_every_operator_of_v3():
    model = _model("mobilenet_v3_small")
    # XNNPACK's quantizer has no h-swish: by default h-swish and h-sigmoid stay float.
    assert {"aten.hardswish.default", "aten.hardsigmoid.default"} <= _unquantized_operators(
        model, integer_only=False
    )
    assert _unquantized_operators(model, integer_only=True) == set()


def test_quantize_integer_only_pte(tmp_path, capsys):
    out = tmp_path / "int8.pte"
    args = ["quantize", "--weights", _weights(tmp_path), "--data", "digits", "--out", str(out)]
    assert main([*args, "--calibration-images", "16", "--integer-only"]) == 0
    assert "every operator in int8" in capsys.readouterr().out
    run, metadata = read_pte(out)
    assert metadata["integer_only"] == "true" and metadata["dtype"] == "int8"
    assert run(torch.randn(1, 3, RES, RES)).shape == (1, 10)


def test_max_batch_is_a_pte_option_refused_elsewhere(tmp_path, capsys):
    args = ["export", "--model", "mobilenet_v1_conv", "--width-mult", "0.25"]
    assert main([*args, "--out", str(tmp_path / "m.onnx"), "--max-batch", "4"]) == 2
    err = capsys.readouterr().err
    assert err == "mobilenet export: error: --max-batch applies to --format pte, not onnx\n"
    assert list(tmp_path.iterdir()) == []
