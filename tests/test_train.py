"""Training end to end: outputs, exact resume, DDP, bad data, bad flags, divergence."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet import create_model
from mobilenet.classification.task import TrainConfig, train
from mobilenet.cli import main
from mobilenet.train import TrainingDiverged, get_recipe
from mobilenet.weights import read_checkpoint

from .helpers import ENV, digits_config, kill_mid_epoch, poison_losses
from .helpers import mobilenet_command as cli

QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "64"]
QUICK += ["--workers", "0", "--quiet"]


def _digit_images(tmp_path: Path, n: int = 3) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    paths = []
    for i in range(n):
        path = tmp_path / f"digit_{digits.target[i]}_{i}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.slow
def test_train_writes_the_run_folder_then_eval_and_predict(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--epochs", "3", "--out", str(out), *QUICK]) == 0
    assert "best validation top-1" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"best.safetensors", "last.pt", "metrics.csv", "config.json", "curves.png"} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {"train_loss", "val_top1", "val_top5", "images_per_s", "lr"} <= set(rows[0])
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["name"] == "demo" and config["recipe"]["epochs"] == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, metadata = read_checkpoint(out / "best.safetensors")
    assert json.loads(metadata["classes"]) == [str(i) for i in range(10)]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and {"optimizer", "scheduler", "rng", "model"} <= set(last)

    weights = str(out / "best.safetensors")
    assert main(["eval", "--weights", weights, "--data", "digits", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"top1", "top5", "loss", "images"} and metrics["images"] == 297
    assert metrics["top1"] > 30 and metrics["top5"] >= metrics["top1"]  # chance is 10%
    best_row = max(rows, key=lambda r: float(r["val_top1"]))
    assert metrics["top1"] == pytest.approx(float(best_row["val_top1"]), abs=1e-6)

    images = _digit_images(tmp_path)
    assert main(["predict", "--weights", weights, *images, "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in predictions] == images
    for p in predictions:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert {t["class"] for t in p["top"]} <= {str(i) for i in range(10)}


def test_predict_and_eval_bad_input(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--epochs", "1", "--out", str(out), *QUICK]) == 0
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    weights = str(out / "best.safetensors")
    capsys.readouterr()
    assert main(["predict", "--weights", weights, str(bad)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["eval", "--weights", weights, "--data", str(tmp_path / "missing")]) == 2
    assert "data not found" in capsys.readouterr().err


def _final_state(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(tmp_path):
    args = ["train", "--data", "digits", "--recipe", "paper-v2", "--epochs", "3", *QUICK]
    interrupted = tmp_path / "interrupted"
    assert kill_mid_epoch(args, interrupted) < 3  # killed in the middle of an epoch
    resumed = cli(*args, "--out", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = cli(*args, "--out", str(tmp_path / "straight"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    a, b = _final_state(interrupted), _final_state(tmp_path / "straight")
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert a["history"][-1]["val_top1"] == b["history"][-1]["val_top1"]


def test_resume_without_a_run_fails_cleanly(tmp_path):
    result = cli("train", "--data", "digits", "--out", str(tmp_path / "new"), "--resume", *QUICK)
    assert result.returncode == 2 and "nothing to resume" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_distributed_two_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mobilenet", "train", "--data", "digits", "--epochs", "2", "--out", str(out),
        *QUICK, "--grad-accum-steps", "2", "--aug-repeats", "2",  # no_sync, the copies' ranks
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("best validation top-1") == 1  # only rank 0 prints
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["best.safetensors", "last.pt", "metrics.csv", "config.json", "curves.png", "summary.json"]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["replica_checksums"]
    assert first == second  # both ranks hold identical weights and statistics
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len(list(csv.DictReader((out / "metrics.csv").open()))) == 2


def _folder_with_bad_files(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for cls in (0, 1, 2):
        (root / f"digit{cls}").mkdir(parents=True)
        images = digits.images[digits.target == cls][:30]
        for i, image in enumerate(images):
            array = (image * 255 / 16).astype(np.uint8)
            Image.fromarray(array).resize((24, 24)).save(root / f"digit{cls}" / f"{i}.jpg")
    jpeg = (root / "digit0" / "0.jpg").read_bytes()
    (root / "digit0" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "digit1" / "empty.jpg").write_bytes(b"")
    (root / "digit2" / "text.png").write_text("this is text")
    return root


def test_training_on_a_folder_with_broken_files(tmp_path):
    data = _folder_with_bad_files(tmp_path / "data")
    out = tmp_path / "run"
    result = cli("train", "--data", str(data), "--epochs", "1", "--out", str(out), *QUICK[:-3],
                 "--batch-size", "16", "--workers", "1", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "skipped 3 unreadable image file(s)" in result.stderr
    for name in ("truncated.jpg", "empty.jpg", "text.png"):
        assert name in result.stderr
    _, metadata = read_checkpoint(out / "best.safetensors")
    assert json.loads(metadata["classes"]) == ["digit0", "digit1", "digit2"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "no/such/folder"], "data not found: no/such/folder"),
        (["--data", "digits", "--recipe", "turbo"], "unknown recipe 'turbo'"),
        (["--data", "digits", "--epochs", "-3"], "must be > 0"),
        (["--data", "digits", "--val-data", "missing"], "validation data folder not found"),
        (["--data", "digits", "--pretrained", "missing.pth"], "pretrained checkpoint not found"),
        (["--data", "digits", "--weight-decay", "-1"], "weight decay must be >= 0"),
        (["--data", "digits", "--lr", "1e308"], "learning rate must be > 0 and <= 100"),
        (["--data", ""], "--data is an empty path"),
        (["--data", "README.md"], "is a file, not an image folder"),
        (["--data", "digits", "--seed", "-1"], "--seed"),
        (["--data", "digits", "--weight-decay", "nan"], "--weight-decay"),
        (["--data", "digits", "--ema-decay", "1.5"], "EMA decay must be in (0, 1)"),
        (["--data", "digits", "--warmup-epochs", "-2"], "warm-up epochs must be >= 0"),
    ],
)
def test_bad_train_flags_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main(["train", *args, "--out", str(out), *QUICK])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "last.pt").write_bytes(b"precious")
    assert main(["train", "--data", "digits", "--out", str(out), *QUICK]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == b"precious"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_losses(monkeypatch, after=25)  # in epoch 2 of 23 steps
    out = tmp_path / "run"
    cfg = digits_config(out, epochs=3)
    with pytest.raises(TrainingDiverged, match="the loss became nan at epoch 2"):
        train(cfg)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v.float()).all() for v in last["model"].values())


def test_a_run_that_fails_in_its_first_epoch_leaves_no_folder(tmp_path, monkeypatch):
    poison_losses(monkeypatch)
    out = tmp_path / "run"
    cfg = digits_config(out, epochs=2)
    with pytest.raises(TrainingDiverged, match="at epoch 1, step 1"):
        train(cfg)
    assert not out.exists()
    out.mkdir()  # a folder the user made is theirs: kept
    with pytest.raises(TrainingDiverged):
        train(cfg)
    assert out.is_dir()


def test_pretrained_backbone_with_a_new_classifier(tmp_path):
    import torchvision

    source = torchvision.models.mobilenet_v3_small()
    torch.save(source.state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "run"
    recipe = get_recipe("demo", epochs=1, batch_size=64, resolution=32)
    cfg = TrainConfig(
        "mobilenet_v3_small", "digits", out, recipe, workers=0, progress=False, lr=1e-12,
        pretrained=str(tmp_path / "tv.pth"),
    )  # fmt: skip
    train(cfg)
    model = create_model("mobilenet_v3_small", weights=str(out / "best.safetensors"))
    assert model.num_classes == 10
    # The backbone came from the checkpoint (an lr of 1e-12 barely moves it).
    torch.testing.assert_close(
        model.features[3].dw.conv.weight, source.features[3].block[1][0].weight, atol=1e-6, rtol=0
    )


@pytest.mark.slow
def test_int8_quantization_through_onnx_runtime(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--epochs", "4", "--out", str(out), *QUICK]) == 0
    weights, int8 = str(out / "best.safetensors"), tmp_path / "int8.onnx"
    args = ["quantize", "--weights", weights, "--data", "digits", "--out", str(int8)]
    assert main([*args, "--calibration-images", "128"]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("int8", ".int8"))] == [
        "int8.onnx"
    ]
    import onnx

    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # a QDQ int8 model
    from mobilenet.export.onnx import onnx_session, read_metadata

    # V3's stem and first block stay in float32 (faster), unless --integer-only
    assert "features.0, features.1 in float32" in capsys.readouterr().out
    scheme = json.loads(read_metadata(onnx_session(int8))["quantization"])
    assert scheme["float_modules"] == ["features.0", "features.1"]
    every = tmp_path / "every.onnx"
    args[-1] = str(every)
    assert main([*args, "--calibration-images", "32", "--integer-only"]) == 0
    assert "every operator in int8" in capsys.readouterr().out
    assert json.loads(read_metadata(onnx_session(every))["quantization"])["float_modules"] == []
    stem = next(n for n in onnx.load(str(every)).graph.node if n.name.endswith("0/conv/Conv"))
    assert stem.input[1].endswith("DequantizeLinear_Output")  # int8 weights

    capsys.readouterr()
    assert main(["eval", "--weights", str(int8), "--data", "digits", "--json"]) == 0
    quantized = json.loads(capsys.readouterr().out)
    assert main(["eval", "--weights", weights, "--data", "digits", "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert quantized["images"] == reference["images"] == 297
    # A briefly trained digits model loses a few points (the demo's MNIST model: 0.5);
    # this checks a working int8 model, not the accuracy target.
    assert reference["top1"] > 80 and quantized["top1"] >= reference["top1"] - 8

    # Reloaded, the int8 file computes exactly what it computed before.
    from mobilenet.classification.predict import load_trained

    first, second = load_trained(str(int8)), load_trained(str(int8))
    assert first.classes == [str(i) for i in range(10)] and first.resolution == 32
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(first.model(x), second.model(x))


def test_an_image_that_fails_to_decode_is_skipped_and_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / cls / f"{i}.jpg", quality=90)
    broken = tmp_path / "data" / "a" / "0.jpg"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) * 3 // 4])  # the header reads, the pixels do not
    out = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "data"), "--epochs", "1", "--out", str(out)]
    assert main([*args, *QUICK[:4], "--batch-size", "8", "--workers", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 unreadable image(s) skipped: a/0.jpg" in err


def test_a_cuda_index_beyond_the_machine_is_one_line(monkeypatch):
    """torchrun with more processes than GPUs gives rank 1 cuda:1 on a one-GPU machine."""
    from mobilenet.errors import MobileNetError
    from mobilenet.train.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    with pytest.raises(
        MobileNetError, match=r"cuda:1: this machine has 1 CUDA device\(s\) \(torchrun"
    ):
        resolve_device("cuda", local_rank=1)
    with pytest.raises(MobileNetError, match="cuda:3: this machine has 1"):
        resolve_device("cuda:3")


def test_a_step_the_scaler_skips_still_advances_the_schedule_quietly(recwarn):
    """Under --amp the GradScaler skips a step whose gradients overflowed; the schedule
    moves on (as torchvision's and timm's references do) without PyTorch's warning."""
    from mobilenet.train.distributed import Distributed
    from mobilenet.train.state import State

    model = torch.nn.Linear(2, 1)
    dist = Distributed(0, 1, 0, torch.device("cpu"))
    state = State(model, get_recipe("demo"), 0.1, True, False, dist, steps=4)
    before = model.weight.detach().clone()
    loss = model(torch.ones(1, 2)).sum() * float("inf")  # overflowing gradients
    state.step(loss)
    assert torch.equal(model.weight, before)  # the scaler skipped the optimizer step
    assert state.scheduler.last_epoch == 1
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]
