"""``bench --save`` records the medians per machine and configuration; ``predict --engine
auto`` runs the fastest recorded engine it can, and falls back without a record."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet import MobileNetError, create_model, save_weights
from mobilenet.classification.predict import choose_engine
from mobilenet.cli import main
from mobilenet.deployed import Trained
from mobilenet.extras import available
from mobilenet.formats import records as engines
from mobilenet.formats.executorch import PteModel

XEON = {"model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", "cores": 8, "isa": ["AVX2", "VNNI"]}
EPYC = {"model": "AMD EPYC 7763 64-Core Processor", "cores": 8, "isa": ["AVX2"]}
ONNX = available("onnx") and available("onnxruntime")


def _result(medians: dict[str, float], info=XEON, batch=1, threads=1, resolution=224) -> dict:
    """A :func:`mobilenet.bench.run_bench` result, as far as the records read it."""
    rows = [{"engine": e, "median_ms": m} for e, m in medians.items()]
    setting = {"model": "mobilenet_v2", "width_mult": 1.0, "batch": batch}
    return {**setting, "resolution": resolution, "threads": threads, "cpu": info, "engines": rows}


@pytest.fixture
def here(monkeypatch):
    """This machine is the Xeon above."""
    monkeypatch.setattr("mobilenet.machine.cpu", lambda cpuinfo=None: XEON)


@pytest.fixture
def trained(tmp_path) -> Trained:
    """Float weights of mobilenet_v2 from a file (so ONNX Runtime can run them)."""
    net = create_model("mobilenet_v2", num_classes=3).eval()
    return Trained(net, ["a", "b", "c"], 224, tmp_path / "w.safetensors")


def test_the_record_is_written_merged_and_keyed_by_machine_and_config():
    path = engines.save_measurements(_result({"eager": 20.0, "onnxruntime": 8.0}))
    assert path == Path(os.environ["MOBILENET_HOME"]) / "engines.json"
    engines.save_measurements(_result({"eager": 19.0, "eager-fused": 12.0}))  # merged
    engines.save_measurements(_result({"eager": 30.0}, info=EPYC))
    engines.save_measurements(_result({"eager": 50.0}, batch=8))
    machines = json.loads(path.read_text())["machines"]
    assert set(machines) == {engines.machine_key(XEON), engines.machine_key(EPYC)}
    assert "VNNI" in engines.machine_key(XEON)
    records = machines[engines.machine_key(XEON)]["records"]
    assert len(records) == 2  # batch 1 and batch 8
    batch1 = records[engines.config_key("mobilenet_v2", 1.0, 1, 224, 1)]
    assert batch1["median_ms"] == {"eager": 19.0, "onnxruntime": 8.0, "eager-fused": 12.0}
    assert batch1["threads"] == 1 and batch1["resolution"] == 224


def test_a_damaged_record_is_refused_in_one_line():
    engines.records_path().parent.mkdir(parents=True, exist_ok=True)
    engines.records_path().write_text("{not json")
    with pytest.raises(MobileNetError, match=r"engines\.json: not readable"):
        engines.save_measurements(_result({"eager": 1.0}))
    assert main(["bench", "mobilenet_v2", "--engines", "eager", "--save"]) == 2  # before timing


def test_auto_picks_the_fastest_recorded_engine_it_can_run(here, trained):
    engines.save_measurements(_result({"eager-fused": 5.0, "onnxruntime": 8.0, "eager": 9.0}))
    assert choose_engine(trained) == "eager-fused"
    engines.save_measurements(_result({"eager-fused": 9.5}))  # a newer, slower median
    assert choose_engine(trained) == ("onnxruntime" if ONNX else "eager")
    assert choose_engine(trained, "eager") == "eager"  # an explicit choice is kept


def test_auto_ignores_int8_engines_for_float_weights(here, trained):
    medians = {"onnxruntime-int8": 1.0, "torch-int8": 2.0, "eager-fused": 6.0, "eager": 9.0}
    engines.save_measurements(_result(medians))
    assert choose_engine(trained) == "eager-fused"


def test_auto_may_pick_executorch_for_float_weights_and_int8_only_for_int8_files(
    here, trained, monkeypatch
):
    monkeypatch.setattr("mobilenet.formats.available", lambda module: True)  # installed
    medians = {"executorch-int8": 1.0, "executorch": 3.0, "onnxruntime": 4.0, "eager": 9.0}
    engines.save_measurements(_result(medians))
    assert choose_engine(trained) == "executorch"  # the fastest float engine
    monkeypatch.setattr("mobilenet.formats.available", lambda module: module != "executorch")
    assert choose_engine(trained) == "onnxruntime"  # not installed: not a candidate
    # A .pte runs on its own engine, float or int8, whatever was recorded; another engine
    # asked for is refused, not ignored.
    config = trained.model.config
    for precision, own in (("int8", "executorch-int8"), ("float32", "executorch")):
        pte = PteModel(None, config, 224, 8, precision)
        file = Trained(pte, trained.classes, 224, Path(f"m.{precision}.pte"))
        assert choose_engine(file) == choose_engine(file, own) == own
        with pytest.raises(MobileNetError, match=f"runs on its own engine, {own}: not eager"):
            choose_engine(file, "eager")


def test_auto_falls_back_without_a_record_of_this_machine_or_thread_count(here, trained):
    default = "onnxruntime" if ONNX else "eager-fused"
    assert choose_engine(trained) == default  # no record at all
    engines.save_measurements(_result({"eager": 1.0, "onnxruntime": 8.0}, info=EPYC))
    engines.save_measurements(_result({"eager": 1.0, "onnxruntime": 8.0}, threads=4))
    engines.save_measurements(_result({"torch-int8": 1.0}))  # nothing predict can run
    assert torch.get_num_threads() == 1
    assert choose_engine(trained) == default


def test_auto_uses_the_nearest_recorded_batch(here, trained):
    engines.save_measurements(_result({"eager": 4.0, "eager-fused": 5.0}, batch=1))
    engines.save_measurements(_result({"eager": 60.0, "eager-fused": 40.0}, batch=16))
    assert choose_engine(trained, batch=1) == "eager"
    assert choose_engine(trained, batch=2) == "eager"
    assert choose_engine(trained, batch=12) == "eager-fused"


@pytest.mark.slow  # two engine processes, then an export-free predict: about 7 s
def test_bench_save_then_predict_runs_a_recorded_engine(tmp_path, capsys):
    args = ["bench", "mobilenet_v3_small", "--engines", "eager,eager-fused", "--rounds", "1"]
    assert main([*args, "--iterations", "1", "--resolution", "64", "--save", "--json"]) == 0
    captured = capsys.readouterr()
    measured = {r["engine"]: r["median_ms"] for r in json.loads(captured.out)["engines"]}
    assert "engines.json" in captured.err
    net = create_model("mobilenet_v3_small", num_classes=3)
    weights = save_weights(net, tmp_path / "w.safetensors", {"classes": '["a","b","c"]'})
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)).save(image)
    args = ["predict", "--weights", str(weights), str(image), "--resolution", "64", "--json"]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)  # pure JSON on stdout
    assert results[0]["engine"] == min(measured, key=measured.__getitem__)
