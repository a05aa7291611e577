"""Detection on the engine: SSDLite on COCO-format folders or mnist-det, the SSD loss,
COCO mAP (pycocotools); the best weights are those of the highest held-out mAP.

Defaults: SGD with momentum 0.9, warm-up then cosine decay, weight decay 4e-5 without
decay on BatchNorm and biases (the TF and torchvision SSDLite recipes' optimizer; their
600-epoch COCO schedules are far longer than a demo needs), batch 32. Rank 0 evaluates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..card import ModelCard
from ..errors import MobileNetError
from ..limits import check_memory, meta_model
from ..models import create_model
from ..train.distributed import Distributed
from ..train.engine import RunConfig, Setup, fit
from ..train.plot import Panel, plot_panels
from ..train.recipes import Recipe, dense_recipe

__all__ = ["DetectTrainConfig", "DetectTrainResult", "DetectionTask", "train_detector"]

DEFAULT_LR = {"sgd": 0.05, "adamw": 3e-3}


@dataclass
class DetectTrainConfig:
    """One detection training run."""

    model: str
    data: str  # a COCO-format folder, or a built-in set (mnist-det)
    out: Path
    width_mult: float = 1.0
    image_size: int = 320  # SSDLite's input (V2 Section 6.2)
    min_scale: float = 0.2  # the default boxes' sizes (SSD: 0.2 .. 0.95 of the input)
    max_scale: float = 0.95
    val_data: str | None = None  # default: the built-in set's held-out split
    epochs: int = 30
    batch_size: int = 32  # global, over all processes
    optimizer: str = "sgd"  # sgd (momentum 0.9, Nesterov) or adamw
    lr: float | None = None  # default: DEFAULT_LR of the optimizer
    weight_decay: float = 4e-5  # TF SSDLite configs: L2 4e-5
    warmup_epochs: float = 1.0
    ema_decay: float | None = None  # an EMA of the weights is evaluated and saved
    focal: bool = False  # focal loss instead of hard negative mining
    augment: str = "ssd"  # ssd, light or none (see detection.data.train_transform)
    cache: bool = False  # decode and resize the training images once (light/none only)
    flip: bool | None = None  # horizontal flips; default: on, off for digits
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = False
    resume: bool = False
    progress: bool = True
    grad_accum_steps: int = 1  # batches per optimizer step
    compile: bool = False  # the training step through torch.compile

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    def recipe(self) -> Recipe:
        return dense_recipe("ssdlite", self, DEFAULT_LR, self.image_size)

    def run(self) -> RunConfig:
        return RunConfig.of(self, self.recipe())


@dataclass
class DetectTrainResult:
    best_map: float | None
    best_map_50: float | None
    best_epoch: int | None
    final: dict[str, Any]
    seconds: float
    out: Path


def train_detector(cfg: DetectTrainConfig) -> DetectTrainResult:
    result = fit(DetectionTask(cfg), cfg.run())
    val = result.best_val or {}
    return DetectTrainResult(
        val.get("map"),
        val.get("map_50"),
        result.best_epoch,
        result.final,
        result.seconds,
        result.out,
    )


class DetectionTask:
    name = "detection"
    stats = ("loss", "bbox_loss", "cls_loss")
    metrics = ("map", "map_50")
    primary = "map"

    def __init__(self, cfg: DetectTrainConfig) -> None:
        _check_config(cfg)
        self.cfg = cfg
        self.train_set: Any = None
        self.val_set: Any = None

    def setup(self, dist: Distributed) -> Setup:
        from .builtin import BUILTIN_DETECTION, dataset_root
        from .data import CocoDetection, collate, eval_transform, train_transform
        from .loss import LossConfig

        cfg = self.cfg
        shape = meta_model(cfg.model, width_mult=cfg.width_mult, image_size=cfg.image_size)
        check_memory(
            shape,
            cfg.image_size,
            cfg.batch_size // dist.world_size,
            "the training",
            training=True,
            device=dist.device,
        )
        # The training set fixes the classes; the model is built for them.
        flip = cfg.flip if cfg.flip is not None else cfg.data != "mnist-det"
        train_set = CocoDetection(
            dataset_root(cfg.data, "train"), train_transform(cfg.image_size, flip, cfg.augment)
        )
        if cfg.cache:
            train_set.cache_resized(cfg.image_size, threads=torch.get_num_threads())
        val_root = cfg.val_data or (
            str(dataset_root(cfg.data, "val")) if cfg.data in BUILTIN_DETECTION else None
        )
        if val_root is not None and dist.is_main:
            self.val_set = CocoDetection(
                dataset_root(val_root), eval_transform(), train_set.categories
            )
        self.train_set = train_set
        model = create_model(
            cfg.model,
            width_mult=cfg.width_mult,
            num_classes=len(train_set.categories) + 1,
            image_size=cfg.image_size,
            min_scale=cfg.min_scale,
            max_scale=cfg.max_scale,
        )
        model.loss_config = LossConfig(focal=cfg.focal)
        return Setup(model, train_set, collate, validates=val_root is not None)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [
            {
                "boxes": t["boxes"].as_subclass(torch.Tensor).to(device),
                "labels": t["labels"].to(device),
            }
            for t in targets
        ]
        losses = model(images, targets)
        box, cls = losses["bbox_regression"], losses["classification"]
        loss = box + cls
        stats = {"loss": loss.item(), "bbox_loss": box.item(), "cls_loss": cls.item()}
        return loss, stats, len(images)

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        if self.val_set is None:  # another rank: rank 0 evaluates
            return None
        from .evaluate import evaluate_detector

        metrics = evaluate_detector(model, self.val_set, batch_size=32)
        return {k: metrics[k] for k in self.metrics}

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        categories = self.train_set.categories
        extra = {"epoch": str(epoch), "data": self.cfg.data}
        if val is not None:
            extra["val_map"] = f"{val['map']:.4f}"
            extra["val_map_50"] = f"{val['map_50']:.4f}"
        card = ModelCard(
            task="detection",
            classes=tuple(c.name for c in categories),
            category_ids=tuple(c.id for c in categories),
            extra=extra,
        )
        return card.metadata()

    def config(self) -> dict[str, Any]:
        classes = self.train_set.classes if self.train_set is not None else None
        return {"train": self.cfg.to_dict(), "classes": classes}

    def epoch_line(self, row: dict[str, Any], epochs: int) -> str:
        val = (
            f"  val mAP {row['val_map']:.3f}  mAP@.5 {row['val_map_50']:.3f}"
            if row["val_map"] is not None
            else ""
        )
        return (
            f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.3f} "
            f"(box {row['train_bbox_loss']:.3f}, class {row['train_cls_loss']:.3f}){val}  "
            f"{row['images_per_s']:.1f} img/s"
        )

    def plot(self, history: list[dict[str, Any]], path: Path) -> None:
        plot_detection_curves(history, path, f"{self.cfg.model} on {self.cfg.data}")


def _check_config(cfg: DetectTrainConfig) -> None:
    from ..extras import require
    from .builtin import BUILTIN_DETECTION, dataset_root
    from .model import check_box_scales

    check_box_scales(cfg.min_scale, cfg.max_scale)
    if cfg.optimizer not in DEFAULT_LR:
        raise MobileNetError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.cache and cfg.augment == "ssd":
        raise MobileNetError(
            "caching resized images needs --augment light or none "
            "(SSD's zoom-out and crops work on the full-size images)"
        )
    dataset_root(cfg.data, "train")  # raises for a missing folder
    if cfg.val_data is not None or cfg.data in BUILTIN_DETECTION:
        require("pycocotools", "detection", "COCO mAP")  # before training, not after it


def plot_detection_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Training losses and validation mAP per epoch, as a PNG."""
    epochs = [r["epoch"] for r in rows]
    losses = {
        label: (epochs, [r[key] for r in rows])
        for key, label in (
            ("train_loss", "total"),
            ("train_bbox_loss", "box"),
            ("train_cls_loss", "class"),
        )
    }
    evaluated = [r for r in rows if r["val_map"] is not None]
    maps = {
        label: ([r["epoch"] for r in evaluated], [r[key] for r in evaluated])
        for key, label in (("val_map", "mAP@[.5:.95]"), ("val_map_50", "mAP@.5"))
    }
    plot_panels(
        [Panel("training loss", "loss", losses), Panel("held-out mAP", "COCO mAP", maps, (0, 1))],
        path,
        title,
    )
