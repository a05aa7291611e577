"""The segmentation task on the shared engine: its loss, the unified train/eval/predict
commands, non-square crops, and bad data and flags refused in one line."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mobilenet.cli import main
from mobilenet.segmentation.task import SegmentationTask, SegTrainConfig, train_segmenter

from .test_segmentation_data import pairs_folder


class _Fixed(nn.Module):
    """Returns the logits it was given: ``{"out"}`` and, with ``aux``, ``{"aux"}``."""

    def __init__(self, out, aux=None):
        super().__init__()
        self.out, self.aux = out, aux

    def forward(self, images):
        return {"out": self.out} if self.aux is None else {"out": self.out, "aux": self.aux}


def test_loss_is_cross_entropy_ignoring_255_plus_half_the_aux_loss(tmp_path):
    task = SegmentationTask(SegTrainConfig("lraspp_mobilenet_v3_small", str(tmp_path), tmp_path))
    g = torch.Generator().manual_seed(0)
    out, aux = torch.randn(2, 4, 6, 5, generator=g), torch.randn(2, 4, 6, 5, generator=g)
    masks = torch.randint(0, 4, (2, 6, 5), generator=g)
    masks[0, :2] = 255
    images = torch.zeros(2, 3, 6, 5)
    loss, stats, n = task.loss(_Fixed(out), (images, masks), torch.device("cpu"))
    expected = F.cross_entropy(out, masks, ignore_index=255)
    assert n == 2 and torch.allclose(loss, expected) and stats["loss"] == pytest.approx(loss.item())
    kept = masks != 255
    accuracy = (out.argmax(1) == masks)[kept].float().mean().item()
    assert stats["pixel_accuracy"] == pytest.approx(accuracy)
    loss, _, _ = task.loss(_Fixed(out, aux), (images, masks), torch.device("cpu"))
    assert torch.allclose(loss, expected + 0.5 * F.cross_entropy(aux, masks, ignore_index=255))
    ignored = torch.full_like(masks, 255)  # nothing to score: 0, not NaN (which stops a run)
    loss, _, _ = task.loss(_Fixed(out), (images, ignored), torch.device("cpu"))
    assert loss.item() == 0.0


def _train_args(root, out, epochs=1):
    return ["train", "--model", "lraspp_mobilenet_v3_small", "--width-mult", "0.35",
            "--data", str(root), "--val-data", str(root), "--resolution", "32",
            "--epochs", str(epochs), "--batch-size", "4", "--workers", "0", "--quiet",
            "--out", str(out)]  # fmt: skip


@pytest.mark.slow
def test_unified_commands_follow_the_model(tmp_path, capsys):
    root = pairs_folder(tmp_path / "data", n=8, classes=3)
    run = tmp_path / "run"
    assert main(_train_args(root, run, epochs=2)) == 0
    assert "best held-out mIoU" in capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "segmentation" and config["classes"] == ["c0", "c1", "c2"]
    summary = json.loads((run / "summary.json").read_text())
    rows = torch.load(run / "last.pt", weights_only=True)["history"]
    best = max(rows, key=lambda r: r["val_miou"])  # the best weights: the highest mIoU
    assert summary["best_epoch"] == best["epoch"]
    assert summary["best_val_miou"] == pytest.approx(best["val_miou"])

    weights = str(run / "best.safetensors")
    # eval and predict read the task from the checkpoint: no --model
    assert main(["eval", "--weights", weights, "--data", str(root), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["iou"]) == {"c0", "c1", "c2"} and metrics["images"] == 8
    assert metrics["miou"] == pytest.approx(summary["best_val_miou"], abs=1e-4)
    # eval runs on --device with --workers, as a classifier's does
    assert main(["eval", "--weights", weights, "--data", str(root), "--device", "cpu",
                 "--workers", "0"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "mIoU" in text and "pixel accuracy" in text and "c2" in text

    image = str(root / "images" / "1.png")
    out = tmp_path / "masks"
    assert main(["predict", "--weights", weights, image, "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)[0]
    mask = Image.open(result["mask"])
    assert mask.mode == "P" and mask.size == (32, 24)  # the image's own size
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}
    overlay = Image.open(out / "1_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == (32, 24)
    assert sum(result["classes"].values()) == pytest.approx(1, abs=1e-3)


@pytest.mark.slow
def test_non_square_crops_train_and_are_saved(tmp_path):
    from mobilenet.weights import read_checkpoint

    root = pairs_folder(tmp_path / "data", n=4, classes=3, size=(30, 50))
    cfg = SegTrainConfig(
        "lraspp_mobilenet_v3_small", str(root), tmp_path / "run", width_mult=0.35,
        crop_size=(32, 48), epochs=1, batch_size=2, workers=0, progress=False,
    )  # fmt: skip
    result = train_segmenter(cfg)
    assert result.best_miou is None  # a pairs folder without --val-data: no held-out set
    _, metadata = read_checkpoint(tmp_path / "run" / "best.safetensors")
    assert metadata["resolution"] == "32x48" and metadata["task"] == "segmentation"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--focal"], "--focal applies to detection models"),
        (["--recipe", "demo"], "--recipe applies to classification models"),
        (["--aux-loss"], "--aux-loss: lraspp_mobilenet_v3_small has no auxiliary head"),
        (["--optimizer", "rmsprop_tf", "--lr", "0.1"], "optimizer must be sgd or adamw"),
        (["--data", "nowhere"], "data not found: nowhere"),
        (["--val-data", "nowhere"], "held-out data folder not found: nowhere"),
    ],
)
def test_bad_flags_and_data_are_one_line(args, message, tmp_path, capsys):
    root = pairs_folder(tmp_path / "data", n=2)
    out = tmp_path / "run"
    base = ["train", "--model", "lraspp_mobilenet_v3_small", "--data", str(root)]
    assert main([*base, "--out", str(out), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_flag_of_segmentation_is_refused_for_others(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mobilenet_v2", "--aux-loss", "--data", "digits",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--aux-loss applies to segmentation models" in capsys.readouterr().err
    assert not out.exists()


def test_data_without_usable_pairs_leaves_no_run_folder(tmp_path, capsys):
    root = pairs_folder(tmp_path / "data", n=2)
    for mask in (root / "masks").iterdir():
        mask.write_bytes(b"broken")
    out = tmp_path / "run"
    assert main(["train", "--model", "lraspp_mobilenet_v3_small", "--data", str(root),
                 "--out", str(out), "--workers", "0", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert "2 image/mask pair(s) skipped (2 mask unreadable)" in err[0]  # the counted skip
    assert err[-1].endswith("no usable image/mask pairs") and len(err) == 2
    assert not out.exists()


@pytest.fixture
def segmenter(tmp_path):
    """A saved, untrained segmentation model, as training writes it."""
    from mobilenet.models import create_model
    from mobilenet.weights import save_weights

    model = create_model("lraspp_mobilenet_v3_small", width_mult=0.35, num_classes=3)
    metadata = {"task": "segmentation", "classes": '["a", "b", "c"]', "image_size": "32x32"}
    return str(save_weights(model, tmp_path / "seg.safetensors", metadata))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "{image}"], "give --out FOLDER"),
        (["predict", "{image}", "--out", "{image}"], "is a file, not a folder"),
        (["predict", "{image}", "{tmp}/missing.png", "--out", "{tmp}/o"], "image not found"),
        (["predict", "{image}", "{tmp}/text.png", "--out", "{tmp}/o"], "not a readable image"),
        (["predict", "{image}", "--min-score", "0.5", "--out", "{tmp}/o"],
         "--min-score applies to detection models"),
        (["eval", "--data", "{tmp}", "--resolution", "64"],
         "seg.safetensors takes 32x32 images, not 64"),
        (["eval", "--data", "{tmp}/nowhere"], "data not found"),
    ],
)  # fmt: skip
def test_eval_and_predict_refuse_bad_input_in_one_line(args, message, segmenter, tmp_path, capsys):
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30)).save(image)
    (tmp_path / "text.png").write_text("not an image")
    args = [a.format(image=image, tmp=tmp_path) for a in args]
    assert main([args[0], "--weights", segmenter, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()  # nothing written before every input is checked


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_eval_on_a_missing_cuda_device_is_one_line(segmenter, tmp_path, capsys):
    args = ["eval", "--weights", segmenter, "--data", str(tmp_path), "--device", "cuda"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is available" in err and len(err.strip().splitlines()) == 1, err
