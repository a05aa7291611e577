"""The detection task on the shared engine: the unified commands, EMA, exact resume after
SIGKILL, and flags of another task refused."""

import json
import sys

import pytest
import torch
from PIL import Image

from mobilenet.cli import main

from .helpers import kill_mid_epoch, mobilenet_command


def _coco_folder(root, n):
    """``n`` 64x64 images, each with one box of class "a" or "b"."""
    root.mkdir(parents=True)
    images, annotations = [], []
    for i in range(1, n + 1):
        Image.new("RGB", (64, 64), (20 * (i % 10), 120, 150)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        box = [2 * (i % 16), 4 + i % 8, 20, 24]
        annotations.append({"id": i, "image_id": i, "bbox": box, "category_id": 1 + i % 2})
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _train_args(root, epochs):
    return ["train", "--model", "ssdlite_mobilenet_v3_small", "--width-mult", "0.35",
            "--data", str(root), "--val-data", str(root), "--resolution", "64",
            "--epochs", str(epochs), "--batch-size", "4", "--workers", "0",
            "--augment", "ssd", "--ema-decay", "0.9", "--quiet"]  # fmt: skip


@pytest.mark.slow
def test_detection_resume_after_sigkill_is_bit_exact(tmp_path):
    root = _coco_folder(tmp_path / "data", 24)
    args = _train_args(root, 4)
    interrupted = tmp_path / "interrupted"
    assert kill_mid_epoch(args, interrupted) < 4
    resumed = mobilenet_command(*args, "--out", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    straight = mobilenet_command(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr

    a = torch.load(interrupted / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for part in ("model", "ema"):  # the EMA of the weights works for detectors too
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    timing = ("images_per_s", "epoch_seconds")
    a_rows, b_rows = ([{k: v for k, v in r.items() if k not in timing} for r in x["history"]]
                      for x in (a, b))  # fmt: skip
    assert a_rows == b_rows


@pytest.mark.slow
def test_unified_commands_follow_the_model(tmp_path, capsys):
    root = _coco_folder(tmp_path / "data", 8)
    run = tmp_path / "run"
    assert main([*_train_args(root, 1), "--out", str(run)]) == 0
    assert "best held-out mAP" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "detection" and config["recipe"]["ema_decay"] == 0.9
    summary = json.loads((run / "summary.json").read_text())
    assert {"best_val_map", "best_val_map_50", "best_epoch"} <= set(summary)
    assert (run / "tensorboard").is_dir() or "tensorboard" not in sys.modules

    weights = str(run / "best.safetensors")
    # eval and predict read the task from the checkpoint: no --model, no `detect`
    assert main(["eval", "--weights", weights, "--data", str(root), "--json",
                 "--device", "cpu", "--workers", "0"]) == 0  # fmt: skip
    assert {"map", "map_50", "map_75"} <= set(json.loads(capsys.readouterr().out))
    assert main(["predict", "--weights", weights, str(root / "1.png"), "--json"]) == 0
    assert "detections" in json.loads(capsys.readouterr().out)[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--model", "ssdlite_mobilenet_v3_small", "--recipe", "demo"],
         "--recipe applies to classification models"),
        (["train", "--model", "mobilenet_v3_small", "--focal"],
         "--focal applies to detection models"),
        (["train", "--model", "mobilenet_v3_small", "--no-flip"],
         "--flip/--no-flip applies to detection and segmentation models"),
        (["train", "--model", "ssdlite_mobilenet_v3_small", "--pretrained", "x.pth"],
         "--pretrained applies to classification models"),
        (["train", "--model", "mobilenet_v2", "--optimizer", "sgd"], "give --lr too"),
        (["detect", "train", "--model", "mobilenet_v2"], "unknown model 'mobilenet_v2'"),
    ],
)  # fmt: skip
def test_a_flag_of_another_task_is_refused(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    try:
        code = main([*args, "--data", "digits", "--out", str(out), "--quiet"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_missing_extra_is_named_before_training(tmp_path, monkeypatch, capsys):
    root = _coco_folder(tmp_path / "data", 4)
    for name in [m for m in sys.modules if m.startswith("pycocotools")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    out = tmp_path / "run"
    assert main([*_train_args(root, 1), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith('COCO mAP needs pycocotools: pip install "mobilenet[detection]"')
    assert not out.exists()
