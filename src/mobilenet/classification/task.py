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
from ..layers import DropPath
from ..limits import check_memory, meta_model
from ..models import MobileNet, create_model
from ..models.pretrained import PRETRAINED, resolve_weights
from ..train.cpu import one_thread_worker
from ..train.distributed import Distributed
from ..train.engine import RunConfig, Setup, fit
from ..train.evaluate import ShardSampler, evaluate
from ..train.plot import plot_curves
from ..train.recipes import Recipe
from ..weights import infer_num_classes, load_weights, read_checkpoint, save_weights
from ..weights.hf_hub import is_hub_id
from .distill import (
    FeatureDistilled,
    Teacher,
    check_kd,
    distillation_loss,
    feature_channels,
    load_teacher,
)
from .mixing import BatchMixing, check_mixing, dominant_label, soft_target_cross_entropy

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
    grad_accum_steps: int = 1  # batches per optimizer step
    compile: bool = False  # the training step through torch.compile
    eval_every: int = 1
    teacher: str | None = None  # distil from this classifier (any file eval reads)
    teacher_model: str | None = None  # its architecture, for torchvision/timm/Keras weights
    kd_features: float = 0.0  # weight of feature distillation (0: the logits only)
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
    """Cross-entropy on image classes, with what a modern recipe adds: MixUp/CutMix
    (soft targets; train top-1 is then against each image's dominant label) and
    distillation from a teacher (its cost per step is a training statistic)."""

    name = "classification"
    metrics = ("loss", "top1", "top5")
    primary = "top1"

    def __init__(self, cfg: TrainConfig, model: MobileNet | None = None) -> None:
        _check_config(cfg)
        self.cfg, self.model = cfg, model
        self.stats: tuple[str, ...] = ("loss", "top1")
        if cfg.teacher is not None:
            self.stats += ("teacher_ms",)
        self.val_loader: DataLoader | None = None
        self.mixing: BatchMixing | None = None
        self.teacher: Teacher | None = None
        self.distilled: FeatureDistilled | None = None  # with feature distillation

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
        r, count = cfg.recipe, len(split.classes)
        if r.mixup > 0 or r.cutmix > 0:
            self.mixing = BatchMixing(r.mixup, r.cutmix, r.mix_prob, r.switch_prob, count)
        trained: nn.Module = model
        if cfg.teacher is not None:
            mean, std = self.preprocess.mean, self.preprocess.std
            teacher = load_teacher(
                cfg.teacher, cfg.teacher_model, count, split.classes, dist.device, mean, std
            )
            if cfg.kd_features > 0:
                teacher.require_module()
                channels = feature_channels(teacher, cfg.recipe.resolution)
                self.distilled = FeatureDistilled(model, channels)
                trained = self.distilled
            self.teacher = teacher
        if split.val is not None:
            self.val_loader = DataLoader(
                split.val,
                batch_size=per_process * 2,
                sampler=ShardSampler(split.val, dist.rank, dist.world_size),
                num_workers=cfg.workers,
                worker_init_fn=one_thread_worker if cfg.workers else None,
                pin_memory=dist.device.type == "cuda",
            )
        return Setup(trained, split.train, validates=split.val is not None, save=_save_student)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        images, targets = batch
        memory_format = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        smoothing = self.cfg.recipe.label_smoothing
        if self.mixing is not None:
            images, soft = self.mixing(images, targets)
            targets = dominant_label(soft)
        out = model(images)
        logits, projected = out if isinstance(out, tuple) else (out, None)
        if self.mixing is not None:
            loss = soft_target_cross_entropy(logits, soft, smoothing)
        else:
            loss = F.cross_entropy(logits, targets, label_smoothing=smoothing)
        stats: dict[str, float] = {}
        if self.teacher is not None:
            loss, stats["teacher_ms"] = self._distil(loss, logits, projected, images)
        top1 = 100 * (logits.argmax(1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "top1": top1, **stats}, len(targets)

    def _distil(
        self,
        loss: torch.Tensor,
        logits: torch.Tensor,
        projected: torch.Tensor | None,
        images: torch.Tensor,
    ) -> tuple[torch.Tensor, float]:
        """The task's loss with the teacher's: the logits' KL at the recipe's temperature,
        and the feature maps' MSE where the student is a :class:`FeatureDistilled`; and
        the teacher's milliseconds on this batch."""
        assert self.teacher is not None
        r, teacher = self.cfg.recipe, self.teacher
        seconds = teacher.seconds
        if projected is None:
            taught = teacher(images)
        else:
            assert self.distilled is not None
            taught, maps = teacher.logits_and_features(images)
            loss = loss + self.cfg.kd_features * self.distilled.feature_loss(projected, maps)
        loss = distillation_loss(loss, logits, taught, r.kd_alpha, r.kd_temperature)
        return loss, 1000 * (teacher.seconds - seconds)

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        assert self.val_loader is not None
        metrics = evaluate(model, self.val_loader, dist, self.cfg.channels_last, self.cfg.amp)
        return {k: metrics[k] for k in self.metrics}

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        cfg = self.cfg
        extra = {"epoch": str(epoch), "data": cfg.data}
        if cfg.teacher is not None:
            extra["teacher"] = Path(cfg.teacher).name
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
        # Mixed images have two labels: top-1 is against the one with the larger share.
        top1 = "train top-1 (dominant label)" if self.mixing is not None else "train top-1"
        teacher = (
            f"  teacher {row['train_teacher_ms']:.0f} ms/batch" if "train_teacher_ms" in row else ""
        )
        return (
            f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.2e}  train loss "
            f"{row['train_loss']:.4f}  {top1} {row['train_top1']:.2f}%{val}  "
            f"{row['images_per_s']:.0f} img/s{teacher}"
        )

    def plot(self, history: list[dict[str, Any]], path: Path) -> None:
        plot_curves(history, path, f"{self.cfg.model} on {self.cfg.data}")


def build_model(cfg: TrainConfig) -> MobileNet:
    """The network without its classifier (the caller adds one for the data's classes)."""
    recipe = cfg.recipe
    kwargs: dict[str, Any] = {"width_mult": cfg.width_mult, "num_classes": 0}
    if recipe.dropout is not None:
        kwargs["dropout"] = recipe.dropout
    if recipe.drop_path > 0:  # a network without residuals refuses it rather than ignore it
        kwargs["drop_path_rate"] = recipe.drop_path
    model = create_model(cfg.model, **kwargs)
    assert isinstance(model, MobileNet)
    if recipe.drop_path_flat:  # the config's flat_stochastic_depth_drop_rate: one rate
        for m in model.modules():
            if isinstance(m, DropPath):
                m.p = recipe.drop_path
    if cfg.pretrained:
        # Start from any checkpoint load_weights accepts (a file, an official key, a URL,
        # a hub id); its classifier is replaced by one for the dataset's classes afterwards.
        path = resolve_weights(cfg.pretrained, model=cfg.model)
        state_dict, metadata = read_checkpoint(path)
        model.reset_classifier(infer_num_classes(state_dict, MobileNet))
        load_weights(model, state_dict, source_name=cfg.pretrained, metadata=metadata)
    elif recipe.bn_eps is not None:
        # The recipe's BatchNorm epsilon is part of training from scratch; pretrained
        # weights keep the epsilon they were trained with.
        model.set_bn_eps(recipe.bn_eps)
    if recipe.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = recipe.bn_momentum
    return model


def _save_student(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """The best weights are the student's alone (not a feature projection's)."""
    save_weights(model.student if isinstance(model, FeatureDistilled) else model, path, metadata)


def _check_config(cfg: TrainConfig) -> None:
    from ..data.shards import is_shards

    r = cfg.recipe
    check_mixing(r.mixup, r.cutmix, r.mix_prob, r.switch_prob)
    if not 0 <= r.drop_path < 1:
        raise MobileNetError(f"--drop-path must be in [0, 1), got {r.drop_path}")
    check_kd(r.kd_alpha, r.kd_temperature)
    if not cfg.kd_features >= 0:
        raise MobileNetError(f"--kd-features must be >= 0, got {cfg.kd_features}")
    if cfg.teacher is None and (cfg.kd_features or cfg.teacher_model):
        flag = "--kd-features" if cfg.kd_features else "--teacher-model"
        raise MobileNetError(f"{flag} needs a --teacher")
    if cfg.teacher is not None and not Path(cfg.teacher).is_file():
        raise MobileNetError(f"--teacher {cfg.teacher}: no such file")
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
    named = cfg.pretrained is not None and (
        is_hub_id(cfg.pretrained) or cfg.pretrained in PRETRAINED or "://" in cfg.pretrained
    )
    if cfg.pretrained is not None and not named and not Path(cfg.pretrained).is_file():
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
