"""Detection data (COCO folders, bad annotations, mnist-det), COCO mAP, and the CLI."""

import json
import warnings

import pytest
import torch
from PIL import Image

from mobilenet.cli import main
from mobilenet.detection.builtin import make_mnist_det
from mobilenet.detection.data import CocoDetection, collate, eval_transform, train_transform
from mobilenet.detection.evaluate import coco_map
from mobilenet.errors import MobileNetError


def _folder(root, images, annotations, categories=({"id": 3, "name": "a"}, {"id": 7, "name": "b"})):
    root.mkdir(parents=True, exist_ok=True)
    for info in images:
        if info.pop("_write", True):
            Image.new("RGB", (info["width"], info["height"]), (90, 120, 150)).save(
                root / info["file_name"]
            )
    coco = {"images": images, "annotations": annotations, "categories": list(categories)}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def _ann(i, image_id, bbox, category_id=3):
    return {"id": i, "image_id": image_id, "bbox": bbox, "category_id": category_id}


def test_bad_annotations_are_clipped_or_skipped_with_one_warning(tmp_path):
    root = _folder(
        tmp_path / "d",
        [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": "missing.png", "width": 64, "height": 48, "_write": False},
        ],
        [
            _ann(1, 1, [10, 10, 20, 20]),  # fine
            _ann(2, 1, [50, 40, 30, 30], 7),  # reaches outside: clipped to [50, 40, 64, 48]
            _ann(3, 1, [100, 100, 10, 10]),  # entirely outside: skipped
            _ann(4, 1, [5, 5, 0, 10]),  # zero area: skipped
            _ann(5, 1, [5, 5, 10, 10], 99),  # unknown category: skipped
            _ann(6, 2, [5, 5, 10, 10]),  # its image file is missing: skipped with the image
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = CocoDetection(root, eval_transform())
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    for part in (
        "1 boxes clipped to the image",
        "1 boxes skipped (outside the image)",
        "1 boxes skipped (zero area)",
        "1 boxes skipped (unknown category id)",
        "1 images skipped (file missing)",
    ):
        assert part in messages[0]
    assert len(data) == 1 and data.classes == ["a", "b"]
    image, target = data[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32
    assert target["boxes"].tolist() == [[10, 10, 30, 30], [50, 40, 64, 48]]
    assert target["labels"].tolist() == [1, 2]  # category ids 3, 7 -> labels 1, 2


def test_training_step_on_augmented_batches(tmp_path):
    from mobilenet import create_model

    root = _folder(
        tmp_path / "d",
        [{"id": i, "file_name": f"{i}.png", "width": 80, "height": 60} for i in (1, 2, 3)],
        [_ann(1, 1, [10, 10, 30, 30]), _ann(2, 2, [0, 0, 80, 60], 7), _ann(3, 3, [70, 50, 20, 20])],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the clipped box
        data = CocoDetection(root, train_transform(64, flip=True, augment="ssd"))
    torch.manual_seed(0)
    images, targets = collate([data[i] for i in range(3)])
    assert all(image.shape == (3, 64, 64) for image in images)
    model = create_model(
        "ssdlite_mobilenet_v3_small", width_mult=0.35, num_classes=3, image_size=64
    )
    losses = model.train()(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("augment", ["none", "light"])
def test_cached_resized_images_equal_resizing_every_time(tmp_path, augment):
    make_mnist_det(tmp_path / "m", train_images=4, val_images=1)
    transform = train_transform(96, flip=True, augment=augment)
    plain = CocoDetection(tmp_path / "m" / "train", transform)
    cached = CocoDetection(tmp_path / "m" / "train", transform)
    cached.cache_resized(96)
    for i in range(len(plain)):
        torch.manual_seed(i)
        a_image, a = plain[i]
        torch.manual_seed(i)
        b_image, b = cached[i]
        assert b_image.shape == (3, 96, 96)
        assert torch.equal(a_image, b_image)
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])


def test_training_resize_matches_the_detectors_own(tmp_path):
    """Training images are resized as the detector resizes what it is given, so a model
    trained on resized images sees the same pixels when it is handed full-size ones."""
    from torchvision import tv_tensors

    from mobilenet import create_model

    image = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8, generator=torch.Generator())
    boxes = tv_tensors.BoundingBoxes(
        [[30.0, 20.0, 90.0, 80.0]], format="XYXY", canvas_size=(200, 300)
    )
    resized, target = train_transform(96, flip=False, augment="none")(
        tv_tensors.Image(image), {"boxes": boxes, "labels": torch.tensor([1])}
    )
    model = create_model("ssdlite_mobilenet_v3_small", num_classes=3, image_size=96)
    batch, sizes = model.preprocess([image.float() / 255])
    own = batch[0] * 0.5 + 0.5  # undo the detector's normalisation
    assert sizes == [(200, 300)]
    assert (resized - own).abs().max() <= 1 / 255 + 1e-4  # uint8 rounding
    assert target["boxes"][0].tolist() == pytest.approx([9.6, 9.6, 28.8, 38.4])


def test_caching_is_refused_with_crops_before_the_resize(tmp_path):
    from mobilenet.detection.task import DetectTrainConfig, train_detector

    root = _folder(
        tmp_path / "d",
        [{"id": 1, "file_name": "1.png", "width": 64, "height": 64}],
        [_ann(1, 1, [8, 8, 20, 24])],
    )
    cfg = DetectTrainConfig(
        "ssdlite_mobilenet_v3_small", str(root), tmp_path / "run", augment="ssd", cache=True
    )
    with pytest.raises(MobileNetError, match="augment light or none"):
        train_detector(cfg)
    assert not (tmp_path / "run").exists()


def test_mnist_det_is_deterministic_and_coco_readable(tmp_path):
    a = make_mnist_det(tmp_path / "a", train_images=3, val_images=2)
    b = make_mnist_det(tmp_path / "b", train_images=3, val_images=2)
    for split in ("train", "val"):
        assert (a / split / "annotations.json").read_text() == (
            b / split / "annotations.json"
        ).read_text()
        assert (a / split / "00001.jpg").read_bytes() == (b / split / "00001.jpg").read_bytes()
    data = CocoDetection(a / "train")
    assert data.classes == [str(d) for d in range(10)]
    for i in range(len(data)):
        image, target = data[i]
        assert image.shape == (3, 320, 320)
        assert 1 <= len(target["boxes"]) <= 6


def test_pycocotools_map_matches_torchmetrics():
    from torchmetrics.detection import MeanAveragePrecision

    g = torch.Generator().manual_seed(0)
    gt = {
        "images": [],
        "annotations": [],
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)],
    }
    detections, preds, targets = [], [], []
    for image_id in range(1, 9):
        gt["images"].append({"id": image_id, "width": 200, "height": 200})
        xy = torch.rand(4, 2, generator=g) * 150
        boxes = torch.cat([xy, xy + 10 + torch.rand(4, 2, generator=g) * 40], 1)
        labels = torch.randint(1, 4, (4,), generator=g)
        for box, label in zip(boxes.tolist(), labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            gt["annotations"].append(
                {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": label,
                 "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        # predictions: the objects, jittered, plus false positives; random scores
        pred = torch.cat([boxes + torch.randn(4, 4, generator=g) * 4, boxes[:2] + 60]).clamp(0, 200)
        pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 1)
        pred_labels = torch.cat([labels, torch.randint(1, 4, (2,), generator=g)])
        scores = torch.rand(6, generator=g)
        for box, label, score in zip(
            pred.tolist(), pred_labels.tolist(), scores.tolist(), strict=True
        ):
            detections.append(
                {"image_id": image_id, "category_id": label, "score": score,
                 "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
            )  # fmt: skip
        preds.append({"boxes": pred, "scores": scores, "labels": pred_labels})
        targets.append({"boxes": boxes, "labels": labels})
    ours = coco_map(gt, detections)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
    metric.update(preds, targets)
    reference = metric.compute()
    assert 0.1 < ours["map"] < 0.9
    assert ours["map"] == pytest.approx(reference["map"].item(), abs=1e-3)
    assert ours["map_50"] == pytest.approx(reference["map_50"].item(), abs=1e-3)


@pytest.mark.slow
def test_detect_cli_train_eval_predict_export(tmp_path, capsys):
    root = _folder(
        tmp_path / "d",
        [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, 5)],
        [_ann(i, i, [8 * i, 8, 20, 24], 3 if i % 2 else 7) for i in range(1, 5)],
    )
    run = tmp_path / "run"
    args = ["detect", "train", "--model", "ssdlite_mobilenet_v3_small", "--width-mult", "0.35",
            "--data", str(root), "--val-data", str(root), "--image-size", "64", "--epochs", "2",
            "--batch-size", "2", "--workers", "0", "--augment", "light", "--cache",
            "--min-scale", "0.15", "--out", str(run), "--quiet"]  # fmt: skip
    assert main(args) == 0
    for name in ("best.safetensors", "last.pt", "metrics.csv", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert main(args) == 2  # the run exists: --resume needed
    assert main([*args[:-1], "--epochs", "3", "--resume", "--quiet"]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 4  # header + 3 epochs
    capsys.readouterr()

    weights = str(run / "best.safetensors")
    from mobilenet.detection.predict import load_detector

    assert load_detector(weights).model.config.min_scale == 0.15
    assert main(["detect", "eval", "--weights", weights, "--data", str(root), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"map", "map_50"} <= set(metrics) and metrics["images"] == 4

    out = tmp_path / "drawn"
    image = str(root / "1.png")
    assert main(["detect", "predict", "--weights", weights, image, "--out", str(out),
                 "--min-score", "0", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result[0]["detections"] and {"label", "score", "box"} <= set(result[0]["detections"][0])
    assert result[0]["detections"][0]["label"] in ("a", "b")
    assert Image.open(out / "1.png").size == (64, 64)

    onnx_path = tmp_path / "det.onnx"
    assert main(["export", "--model", "ssdlite_mobilenet_v3_small", "--weights", weights,
                 "--out", str(onnx_path)]) == 0  # fmt: skip
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, codes, defaults = session.run(None, {"images": torch.rand(2, 3, 64, 64).numpy()})
    assert logits.shape[:2] == codes.shape[:2] == (2, defaults.shape[0])
    assert logits.shape[2] == 3
    capsys.readouterr()
    assert main(["detect", "eval", "--weights", weights, "--data", str(tmp_path / "nope")]) == 2
    assert "data not found" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_train_under_torchrun_keeps_replicas_equal(tmp_path):
    import os
    import subprocess
    import sys

    root = _folder(
        tmp_path / "d",
        [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in range(1, 9)],
        [_ann(i, i, [4 * i, 8, 20, 24], 3 if i % 2 else 7) for i in range(1, 9)],
    )
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "mobilenet", "detect", "train", "--model", "ssdlite_mobilenet_v3_small",
        "--width-mult", "0.35", "--data", str(root), "--val-data", str(root),
        "--image-size", "64", "--epochs", "2", "--batch-size", "4", "--workers", "0",
        "--augment", "light", "--out", str(out), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["replica_checksums"]
    assert first == second  # DistributedDataParallel and averaged BatchNorm statistics
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs
