"""Classification on the engine: image folders or built-in digit sets, cross-entropy,
top-1 and top-5; the best weights are those of the highest validation top-1."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..card import ModelCard
from ..data import builtin_splits, folder_splits, train_transform
from ..data.datasets import BUILTIN, Split
from ..data.preprocess import Preprocess
from ..data.published import model_preprocess
from ..errors import MobileNetError
from ..limits import check_memory, meta_model
from ..models import MobileNet, create_model
from ..train.cpu import one_thread_worker
from ..train.distributed import Distributed
from ..train.engine import RunConfig, Setup, fit
from ..train.evaluate import ShardSampler, evaluate
from ..train.plot import plot_curves
from ..train.recipes import Recipe
from ..weights import infer_num_classes, load_weights, read_checkpoint

__all__ = ["ClassificationTask", "TrainConfig", "TrainResult", "build_model", "train"]


@dataclass
class TrainConfig:
    """One classification run. Epochs, batch size and resolution live in the recipe."""

    model: str
    data: str  # an image folder, or a built-in dataset name (mnist, digits)
    out: Path
    recipe: Recipe
    width_mult: float = 1.0
    val_data: str | None = None
    val_fraction: float = 0.1  # held out of --data when there is no --val-data
    lr: float | None = None  # absolute learning rate; default: the recipe's, batch-scaled
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    amp: bool = False
    channels_last: bool = True
    pretrained: str | None = None
    resume: bool = False
    progress: bool = True
    eval_every: int = 1
    classes: list[str] = field(default_factory=list)  # filled in from the data

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d

    def run(self) -> RunConfig:
        return RunConfig.of(self, self.recipe, self.lr, self.channels_last)


@dataclass
class TrainResult:
    best_top1: float | None
    best_epoch: int | None
    final: dict[str, Any]
    seconds: float
    out: Path


def train(cfg: TrainConfig, model: MobileNet | None = None) -> TrainResult:
    """Train ``cfg.model`` (or ``model``, an architecture variant built by the caller, e.g.
    for an ablation; it is trained as given, its classifier replaced for the data)."""
    result = fit(ClassificationTask(cfg, model), cfg.run())
    best_top1 = result.best_val["top1"] if result.best_val else None
    return TrainResult(best_top1, result.best_epoch, result.final, result.seconds, result.out)


class ClassificationTask:
    name = "classification"
    stats = ("loss", "top1")
    metrics = ("loss", "top1", "top5")
    primary = "top1"

    def __init__(self, cfg: TrainConfig, model: MobileNet | None = None) -> None:
        _check_config(cfg)
        self.cfg, self.model = cfg, model
        self.val_loader: DataLoader | None = None

    def setup(self, dist: Distributed) -> Setup:
        cfg = self.cfg
        per_process = cfg.recipe.batch_size // dist.world_size
        shape = meta_model(cfg.model, width_mult=cfg.width_mult, num_classes=10)
        check_memory(
            shape,
            cfg.recipe.resolution,
            per_process,
            "the training",
            training=True,
            device=dist.device,
        )
        # The model first: its evaluation config sets the transforms; then a classifier
        # for the data's classes.
        model = build_model(cfg) if self.model is None else self.model
        # What validation and the saved weights' "preprocess" metadata use: ours.
        self.preprocess = model_preprocess(model, cfg.recipe.resolution)
        split = _datasets(cfg, model, self.preprocess)
        cfg.classes = split.classes
        model.reset_classifier(len(split.classes))
        if split.val is not None:
            self.val_loader = DataLoader(
                split.val,
                batch_size=per_process * 2,
                sampler=ShardSampler(split.val, dist.rank, dist.world_size),
                num_workers=cfg.workers,
                worker_init_fn=one_thread_worker if cfg.workers else None,
                pin_memory=dist.device.type == "cuda",
            )
        return Setup(model, split.train, validates=split.val is not None)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        images, targets = batch
        memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        logits = model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.cfg.recipe.label_smoothing)
        top1 = 100 * (logits.argmax(1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "top1": top1}, len(targets)

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        assert self.val_loader is not None
        metrics = evaluate(model, self.val_loader, dist, self.cfg.channels_last, self.cfg.amp)
        return {k: metrics[k] for k in self.metrics}

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        cfg = self.cfg
        extra = {"epoch": str(epoch), "data": cfg.data}
        if val is not None:
            extra["val_top1"] = f"{val['top1']:.4f}"
        card = ModelCard(
            task="classification",
            classes=tuple(cfg.classes),
            input_size=(cfg.recipe.resolution, cfg.recipe.resolution),
            preprocess=self.preprocess,
            extra=extra,
        )
        return card.metadata()

    def config(self) -> dict[str, Any]:
        return {"train": self.cfg.to_dict()}

    def epoch_line(self, row: dict[str, Any], epochs: int) -> str:
        val = (
            f"  val loss {row['val_loss']:.4f}  val top-1 {row['val_top1']:.2f}%"
            if row["val_loss"] is not None
            else ""
        )
        return (
            f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2e}  train loss "
            f"{row['train_loss']:.4f}  train top-1 {row['train_top1']:.2f}%{val}  "
            f"{row['images_per_s']:.0f} img/s"
        )

    def plot(self, history: list[dict[str, Any]], path: Path) -> None:
        plot_curves(history, path, f"{self.cfg.model} on {self.cfg.data}")


def build_model(cfg: TrainConfig) -> MobileNet:
    """The network without its classifier (the caller adds one for the data's classes)."""
    recipe = cfg.recipe
    kwargs: dict[str, Any] = {"width_mult": cfg.width_mult, "num_classes": 0}
    if recipe.dropout is not None:
        kwargs["dropout"] = recipe.dropout
    model = create_model(cfg.model, **kwargs)
    assert isinstance(model, MobileNet)
    if cfg.pretrained:
        # Start from any checkpoint load_weights accepts; its classifier is replaced by
        # one for the dataset's classes afterwards.
        state_dict, metadata = read_checkpoint(cfg.pretrained)
        model.reset_classifier(infer_num_classes(state_dict, MobileNet))
        load_weights(model, state_dict, source_name=cfg.pretrained, metadata=metadata)
    if recipe.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = recipe.bn_momentum
    return model


def _check_config(cfg: TrainConfig) -> None:
    from ..data.shards import is_shards

    if not 0 <= cfg.val_fraction < 1:
        raise MobileNetError(f"validation fraction must be in [0, 1), got {cfg.val_fraction}")
    if not cfg.data:
        raise MobileNetError("--data is an empty path: name an image folder or a built-in set")
    if is_shards(cfg.data) or cfg.data in BUILTIN:
        pass  # tar shards are listed (and refused if missing) when the data is opened
    elif Path(cfg.data).is_file():
        raise MobileNetError(f"--data {cfg.data} is a file, not an image folder")
    elif not Path(cfg.data).is_dir():
        raise MobileNetError(
            f"data not found: {cfg.data} (an image folder, or one of: {', '.join(BUILTIN)})"
        )
    if cfg.val_data is not None and not (Path(cfg.val_data).is_dir() or is_shards(cfg.val_data)):
        raise MobileNetError(f"validation data folder not found: {cfg.val_data}")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise MobileNetError(f"pretrained checkpoint not found: {cfg.pretrained}")


def _datasets(cfg: TrainConfig, model: MobileNet, preprocess: Preprocess) -> Split:
    from ..data.shard_sets import eval_set, shard_splits
    from ..data.shards import is_shards

    # Transforms follow from the model's own evaluation config (mean, std, crop ratio).
    res, aug = cfg.recipe.resolution, cfg.recipe.augment
    train_tf = train_transform(res, aug, model.eval_config)
    eval_tf = preprocess.transform()
    if cfg.data in BUILTIN:
        return builtin_splits(cfg.data, train_tf, eval_tf)
    if is_shards(cfg.data):
        # A stream cannot hold out a random fraction of itself: the held-out images are
        # shards (or a folder) of their own; without them the run trains unvalidated.
        default = TrainConfig.__dataclass_fields__["val_fraction"].default
        if cfg.val_data is None and cfg.val_fraction not in (0, default):
            raise MobileNetError(
                "--val-fraction cannot hold out part of tar shards: give the held-out "
                "shards with --val-data"
            )
        # The global batch: each process's workers split its part in whole batches.
        batch = cfg.recipe.batch_size
        return shard_splits(cfg.data, cfg.val_data, train_tf, eval_tf, cfg.seed, batch)
    if cfg.val_data is not None and is_shards(cfg.val_data):
        train = folder_splits(cfg.data, None, 0, train_tf, eval_tf, cfg.seed)
        return Split(train.train, eval_set(cfg.val_data, eval_tf, train.classes), train.classes)
    return folder_splits(cfg.data, cfg.val_data, cfg.val_fraction, train_tf, eval_tf, cfg.seed)
