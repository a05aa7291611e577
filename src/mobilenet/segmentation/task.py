"""Segmentation on the engine: VOC-layout or image/mask folders, or mnist-seg; per-pixel
cross-entropy (255 ignored), plus 0.5 x the auxiliary head's when the model has one
(torchvision's reference recipe); the best weights are those of the highest held-out
mIoU (a confusion matrix over the whole held-out set, see
:mod:`mobilenet.segmentation.metrics`).

Defaults: the recipe that trains LR-ASPP on MobileNetV3-Small from scratch on mnist-seg
to the benchmark's target on two CPU cores (``benchmarks/segmentation_mnist.json``):
AdamW, warm-up then cosine decay, weight decay without decay on BatchNorm and biases,
BatchNorm momentum 0.1 for a short run (the models' 0.01 follows the TF reference's long
schedules). torchvision's VOC/COCO reference (SGD 0.02, momentum 0.9, weight decay 1e-4,
"poly" decay, 30 epochs, batch 32, crop 480) is ``--optimizer sgd --lr 0.02
--weight-decay 1e-4 --epochs 30 --resolution 480`` here, with cosine decay. Each process
evaluates its shard of the held-out images; their confusion matrices are summed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..card import ModelCard
from ..errors import MobileNetError
from ..limits import check_memory, meta_model
from ..models import create_model, model_task
from ..train.distributed import Distributed
from ..train.engine import RunConfig, Setup, fit
from ..train.plot import Panel, plot_panels
from ..train.recipes import Recipe, dense_recipe
from .data import IGNORE

__all__ = ["SegTrainConfig", "SegTrainResult", "SegmentationTask", "train_segmenter"]

DEFAULT_LR = {"sgd": 0.02, "adamw": 3e-3}
AUX_WEIGHT = 0.5  # torchvision's reference: loss = CE(out) + 0.5 CE(aux)


@dataclass
class SegTrainConfig:
    """One segmentation training run."""

    model: str
    data: str  # a VOC-layout or images/ + masks/ folder, or a built-in set (mnist-seg)
    out: Path
    width_mult: float = 1.0
    crop_size: tuple[int, int] = (128, 128)  # (height, width): training crops, eval input
    scale: tuple[float, float] | None = None  # random resize, x the crop's shorter side;
    # default: (0.5, 2.0) as torchvision's reference, none on mnist-seg (it varies scale)
    aux_loss: bool = False  # DeepLabv3: train the auxiliary FCN head too
    num_classes: int | None = None  # declared for masks without a classes.txt (16-bit ones)
    val_data: str | None = None  # default: a VOC folder's val split, a built-in's held-out
    epochs: int = 12
    batch_size: int = 16  # global, over all processes
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.9, Nesterov)
    lr: float | None = None  # default: DEFAULT_LR of the optimizer
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    bn_momentum: float | None = 0.1  # None keeps the model's 0.01
    ema_decay: float | None = None  # an EMA of the weights is evaluated and saved
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
        return dense_recipe(
            "segmentation", self, DEFAULT_LR, min(self.crop_size), bn_momentum=self.bn_momentum
        )

    def run(self) -> RunConfig:
        return RunConfig.of(self, self.recipe())


@dataclass
class SegTrainResult:
    best_miou: float | None
    best_epoch: int | None
    final: dict[str, Any]
    seconds: float
    out: Path


def train_segmenter(cfg: SegTrainConfig) -> SegTrainResult:
    result = fit(SegmentationTask(cfg), cfg.run())
    val = result.best_val or {}
    return SegTrainResult(
        val.get("miou"), result.best_epoch, result.final, result.seconds, result.out
    )


class SegmentationTask:
    name = "segmentation"
    stats = ("loss", "pixel_accuracy")
    metrics = ("miou", "pixel_accuracy")
    primary = "miou"

    def __init__(self, cfg: SegTrainConfig) -> None:
        _check_config(cfg)
        self.cfg = cfg
        self.classes: list[str] = []
        self.val_set: Any = None
        self.val_iou: dict[str, float | None] = {}

    def setup(self, dist: Distributed) -> Setup:
        from .builtin import BUILTIN_SEGMENTATION, dataset_root
        from .data import SegmentationFolder, collate, eval_transform
        from .data import train_transform as augment

        cfg = self.cfg
        shape = meta_model(cfg.model, **_model_options(cfg, 21))
        check_memory(
            shape,
            cfg.crop_size,
            cfg.batch_size // dist.world_size,
            "the training",
            training=True,
            device=dist.device,
        )
        builtin = cfg.data in BUILTIN_SEGMENTATION
        mean, std = shape.config.mean, shape.config.std
        flip = cfg.flip if cfg.flip is not None else not builtin
        scale = cfg.scale or ((1.0, 1.0) if builtin else (0.5, 2.0))
        root, split = dataset_root(cfg.data, "train")
        train_set = SegmentationFolder(
            root,
            split,
            augment(cfg.crop_size, mean, std, scale, flip),
            check=not builtin,
            num_classes=cfg.num_classes,
        )
        self.classes = train_set.classes
        val = _val_source(cfg, root, train_set.layout)
        if val is not None:
            val_root, val_split = dataset_root(*val)
            self.val_set = SegmentationFolder(
                val_root, val_split, eval_transform(mean, std), self.classes, check=not builtin
            )
        model = create_model(cfg.model, **_model_options(cfg, len(self.classes)))
        if cfg.bn_momentum is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = cfg.bn_momentum
        return Setup(model, train_set, collate, validates=val is not None)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        images, masks = batch
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        masks = masks.to(device, non_blocking=True)
        outputs = model(images)
        scored = (masks != IGNORE).sum().clamp(min=1)  # a batch all 255 gives 0, not NaN
        loss = F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE, reduction="sum")
        if "aux" in outputs:
            aux = F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE, reduction="sum")
            loss = loss + AUX_WEIGHT * aux
        loss = loss / scored
        right = ((outputs["out"].argmax(1) == masks) & (masks != IGNORE)).sum()
        stats = {"loss": loss.item(), "pixel_accuracy": (right / scored).item()}
        return loss, stats, len(images)

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        from ..train.evaluate import ShardSampler
        from .metrics import evaluate_segmenter

        assert self.val_set is not None
        sampler = ShardSampler(self.val_set, dist.rank, dist.world_size)
        confusion = evaluate_segmenter(
            model, self.val_set, self.cfg.crop_size, len(self.classes), 16, sampler
        )
        confusion.matrix = dist.all_reduce(confusion.matrix)
        scores = confusion.scores(self.classes)
        self.val_iou = scores["iou"]
        return {k: scores[k] for k in self.metrics}

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        extra = {"epoch": str(epoch), "data": self.cfg.data}
        if val is not None:
            extra["val_miou"] = f"{val['miou']:.4f}"
            extra["val_iou"] = json.dumps(self.val_iou)
        card = ModelCard(
            task="segmentation",
            classes=tuple(self.classes),
            input_size=tuple(self.cfg.crop_size),
            extra=extra,
        )
        return card.metadata()

    def config(self) -> dict[str, Any]:
        return {"train": self.cfg.to_dict(), "classes": self.classes or None}

    def epoch_line(self, row: dict[str, Any], epochs: int) -> str:
        val = (
            f"  val mIoU {row['val_miou']:.3f}  pixel acc {row['val_pixel_accuracy']:.3f}"
            if row["val_miou"] is not None
            else ""
        )
        return (
            f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2e}  loss {row['train_loss']:.3f} "
            f"(pixel acc {row['train_pixel_accuracy']:.3f}){val}  "
            f"{row['images_per_s']:.1f} img/s"
        )

    def plot(self, history: list[dict[str, Any]], path: Path) -> None:
        epochs = [r["epoch"] for r in history]
        losses = {"total": (epochs, [r["train_loss"] for r in history])}
        loss = Panel("training loss", "cross-entropy", losses)
        done = [r for r in history if r["val_miou"] is not None]
        scores = {
            label: ([r["epoch"] for r in done], [r[key] for r in done])
            for key, label in (("val_miou", "mIoU"), ("val_pixel_accuracy", "pixel accuracy"))
        }
        title = f"{self.cfg.model} on {self.cfg.data}"
        plot_panels([loss, Panel("held-out scores", "score", scores, (0, 1))], path, title)


def _model_options(cfg: SegTrainConfig, num_classes: int) -> dict[str, Any]:
    options: dict[str, Any] = {"width_mult": cfg.width_mult, "num_classes": num_classes}
    if cfg.aux_loss:
        options["aux_loss"] = True
    return options


def _val_source(cfg: SegTrainConfig, root: Path, layout: str) -> tuple[str, str] | None:
    """Where the held-out images are: ``--val-data`` (its val split if it is a VOC
    folder), a built-in set's held-out split, a VOC folder's val split (when it lists
    one), else none (the run is not validated)."""
    from .builtin import BUILTIN_SEGMENTATION

    if cfg.val_data is not None:
        return cfg.val_data, "val"
    if cfg.data in BUILTIN_SEGMENTATION:
        return cfg.data, "val"
    if layout == "voc" and (root / "ImageSets" / "Segmentation" / "val.txt").is_file():
        return str(root), "val"
    return None


def _check_config(cfg: SegTrainConfig) -> None:
    """Refuse what cannot train before anything is written."""
    from ..cost import check_resolution
    from .builtin import BUILTIN_SEGMENTATION

    if cfg.optimizer not in DEFAULT_LR:
        raise MobileNetError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if len(cfg.crop_size) != 2:
        raise MobileNetError(f"crop size must be (height, width), got {cfg.crop_size!r}")
    for side in cfg.crop_size:
        check_resolution(side)
    low, high = cfg.scale or (1, 1)
    if not 0 < low <= high:
        raise MobileNetError(f"scale range must satisfy 0 < low <= high, got {cfg.scale}")
    if cfg.bn_momentum is not None and not 0 < cfg.bn_momentum <= 1:
        raise MobileNetError(f"BatchNorm momentum must be in (0, 1], got {cfg.bn_momentum}")
    if model_task(cfg.model) != SegmentationTask.name:
        raise MobileNetError(f"{cfg.model} is not a segmentation model")
    try:
        meta_model(cfg.model, **_model_options(cfg, 21))
    except MobileNetError as e:
        if cfg.aux_loss and "aux_loss" in str(e):
            raise MobileNetError(f"--aux-loss: {cfg.model} has no auxiliary head") from None
        raise
    if cfg.data not in BUILTIN_SEGMENTATION and not Path(cfg.data).is_dir():
        raise MobileNetError(
            f"data not found: {cfg.data} (a segmentation folder, or one of: "
            f"{', '.join(BUILTIN_SEGMENTATION)})"
        )
    if cfg.val_data is not None and not Path(cfg.val_data).is_dir():
        raise MobileNetError(f"held-out data folder not found: {cfg.val_data}")
