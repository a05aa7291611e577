"""The training loop: read it top to bottom in :func:`train`.

Determinism: the data order, the augmentations and dropout of epoch ``e`` depend only
on ``(seed, e)`` (the sampler, the loader's generator and the global RNG are re-seeded at
the start of every epoch), and ``last.pt`` holds everything else (weights, optimizer,
schedule, EMA, best score) as of the end of an epoch. So ``--resume`` after an
interruption anywhere continues exactly as if the run had never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..data import builtin_splits, eval_transform, folder_splits, train_transform
from ..data.datasets import BUILTIN, Split
from ..errors import MobileNetError
from ..models import EvalConfig, MobileNet, create_model
from ..weights import load_weights, save_weights
from . import checkpoint as ckpt
from .cpu import keep_freed_memory, one_thread_worker
from .distributed import Distributed, setup
from .evaluate import ShardSampler, evaluate
from .optim import build_ema, build_optimizer, build_scheduler
from .plot import plot_curves
from .recipes import Recipe

__all__ = ["TrainConfig", "TrainingDiverged", "build_model", "train"]


class TrainingDiverged(MobileNetError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """One training run. Epochs, batch size and resolution live in the recipe."""

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
    classes: list[str] = field(default_factory=list)  # filled in from the data

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


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
    start_time = time.perf_counter()
    recipe = cfg.recipe
    _check_config(cfg)
    dist = setup(cfg.device)
    if dist.device.type == "cpu":
        keep_freed_memory()  # see mobilenet.train.cpu: fewer page faults per step
    try:
        if cfg.amp and dist.device.type != "cuda":
            raise MobileNetError("--amp needs a CUDA device")
        if recipe.batch_size % dist.world_size:
            raise MobileNetError(
                f"batch size {recipe.batch_size} is not divisible by {dist.world_size} processes"
            )
        out = Path(cfg.out)
        last_path, best_path = out / "last.pt", out / "best.safetensors"
        resumed = ckpt.load_last(last_path) if cfg.resume else None
        torch.manual_seed(cfg.seed)

        # ---- model first: its evaluation config sets the transforms; data: shard each
        # global batch across processes; then a classifier for the data's classes
        model = build_model(cfg) if model is None else model
        split = _datasets(cfg, model.eval_config)
        cfg.classes = split.classes
        model.reset_classifier(len(split.classes))
        sampler = DistributedSampler(
            split.train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        per_process = recipe.batch_size // dist.world_size
        loader_gen = torch.Generator()
        train_loader = _loader(split.train, per_process, sampler, cfg.workers, loader_gen, True)
        val_loader = None
        if split.val is not None:
            val_sampler = ShardSampler(split.val, dist.rank, dist.world_size)
            val_loader = _loader(split.val, per_process * 2, val_sampler, cfg.workers, None, False)
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise MobileNetError(
                f"{len(split.train)} training images: fewer than one batch of "
                f"{recipe.batch_size}; lower --batch-size"
            )

        # ---- optimizer, schedule, EMA
        memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        model.to(dist.device, memory_format=memory_format)
        lr = cfg.lr if cfg.lr is not None else recipe.scaled_lr(recipe.batch_size)
        optimizer = build_optimizer(model, recipe, lr)
        scheduler = build_scheduler(optimizer, recipe, recipe.epochs, steps_per_epoch)
        ema = build_ema(model, recipe.ema_decay)
        scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.amp)
        ddp = (
            DistributedDataParallel(
                model, device_ids=[dist.device] if dist.device.type == "cuda" else None
            )
            if dist.enabled
            else model
        )

        first_epoch, best_top1, best_epoch, history = 0, None, None, []
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            scaler.load_state_dict(resumed["scaler"])
            if ema is not None:
                ema.load_state_dict(resumed["ema"])
            ckpt.set_rng_state(resumed["rng"])
            first_epoch, history = resumed["epoch"], resumed["history"]
            best_top1, best_epoch = resumed["best_top1"], resumed["best_epoch"]

        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config = {"train": cfg.to_dict(), "recipe": recipe.to_dict(), "lr": lr}
            config["world_size"] = dist.world_size
            ckpt.write_json(out / "config.json", config)
        tensorboard = _tensorboard(out) if dist.is_main else None

        # ---- epochs
        for epoch in range(first_epoch, recipe.epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            train_stats = _train_one_epoch(
                ddp, train_loader, optimizer, scheduler, scaler, ema, dist, cfg, epoch
            )
            # Each process updated its BatchNorm statistics on its own shard: average them,
            # so every replica (and its EMA) evaluates and saves the same network.
            dist.average_buffers(model)
            if ema is not None:
                dist.average_buffers(ema.module)
            evaluated = ema.module if ema is not None else model
            val = (
                evaluate(evaluated, val_loader, dist, cfg.channels_last, cfg.amp)
                if val_loader is not None
                else None
            )
            row = {
                "epoch": epoch + 1,
                "lr": train_stats["lr"],
                "train_loss": train_stats["loss"],
                "train_top1": train_stats["top1"],
                "val_loss": val["loss"] if val else None,
                "val_top1": val["top1"] if val else None,
                "val_top5": val["top5"] if val else None,
                "images_per_s": train_stats["images_per_s"],
                "epoch_seconds": train_stats["seconds"],
            }
            history.append(row)
            score = val["top1"] if val else -train_stats["loss"]
            improved = best_top1 is None or score > best_top1
            if improved:
                best_top1, best_epoch = score, epoch + 1
            if dist.is_main:
                if improved:
                    _save_best(evaluated, best_path, cfg, epoch + 1, val)
                ckpt.write_metrics(out / "metrics.csv", history)
                if tensorboard is not None:
                    for key, value in row.items():
                        if key != "epoch" and value is not None:
                            tensorboard.add_scalar(key, value, epoch + 1)
                ckpt.save_last(
                    last_path,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "ema": ema.state_dict() if ema is not None else None,
                        "rng": ckpt.rng_state(),
                        "history": history,
                        "best_top1": best_top1,
                        "best_epoch": best_epoch,
                        "config": json.loads(json.dumps(cfg.to_dict())),
                    },
                )
                if cfg.progress:
                    print(_epoch_line(row, recipe.epochs), flush=True)
            dist.barrier()

        checksums = dist.replica_checksums(model)
        if dist.is_main and history:
            plot_curves(history, out / "curves.png", f"{cfg.model} on {cfg.data}")
            summary = {
                "best_val_top1": best_top1 if split.val is not None else None,
                "best_epoch": best_epoch,
                "final": history[-1],
                "seconds": time.perf_counter() - start_time,
                "world_size": dist.world_size,
                # One checksum per process: DistributedDataParallel keeps replicas equal.
                "replica_checksums": checksums,
            }
            ckpt.write_json(out / "summary.json", summary)
        if tensorboard is not None:
            tensorboard.close()
        return TrainResult(
            best_top1 if split.val is not None else None,
            best_epoch,
            history[-1] if history else {},
            time.perf_counter() - start_time,
            out,
        )
    finally:
        dist.close()


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: torch.optim.swa_utils.AveragedModel | None,
    dist: Distributed,
    cfg: TrainConfig,
    epoch: int,
) -> dict[str, float]:
    model.train()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = _progress(loader, epoch, cfg) if dist.is_main and cfg.progress else None
    for step, (images, targets) in enumerate(bar if bar is not None else loader):
        images = images.to(dist.device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(dist.device, non_blocking=True)
        with torch.autocast(dist.device.type, enabled=cfg.amp):
            logits = model(images)
            loss = F.cross_entropy(logits, targets, label_smoothing=cfg.recipe.label_smoothing)
        finite = dist.all_reduce(torch.isfinite(loss.detach()).to(torch.int32), "min")
        if not bool(finite):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                f"stopped. The last good checkpoint is {Path(cfg.out) / 'last.pt'} "
                "(try a lower --lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if ema is not None:
            ema.update_parameters(_unwrap(model))
        n = len(targets)
        totals += torch.tensor(
            [loss.item() * n, (logits.argmax(1) == targets).sum().item(), n], dtype=torch.float64
        )
        if bar is not None:
            seconds = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{totals[0] / totals[2]:.3f}",
                acc=f"{100 * totals[1] / totals[2]:.1f}%",
                img_s=f"{totals[2] * dist.world_size / seconds:.0f}",
            )
    seconds = time.perf_counter() - start
    totals = dist.all_reduce(totals.to(dist.device)).cpu()
    loss_sum, correct, n = totals.tolist()
    return {
        "loss": loss_sum / n,
        "top1": 100 * correct / n,
        "lr": lr,
        "images_per_s": n / seconds,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- helpers


def _check_config(cfg: TrainConfig) -> None:
    r = cfg.recipe
    if r.epochs <= 0:
        raise MobileNetError(f"epochs must be positive, got {r.epochs}")
    if r.batch_size <= 0:
        raise MobileNetError(f"batch size must be positive, got {r.batch_size}")
    if r.resolution < 32:
        raise MobileNetError(f"resolution must be >= 32, got {r.resolution}")
    if cfg.lr is not None and not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise MobileNetError(f"learning rate must be positive, got {cfg.lr}")
    if cfg.workers < 0:
        raise MobileNetError(f"workers must be >= 0, got {cfg.workers}")
    if not 0 <= cfg.val_fraction < 1:
        raise MobileNetError(f"validation fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.data not in BUILTIN and not Path(cfg.data).is_dir():
        raise MobileNetError(
            f"data not found: {cfg.data} (an image folder, or one of: {', '.join(BUILTIN)})"
        )
    if cfg.val_data is not None and not Path(cfg.val_data).is_dir():
        raise MobileNetError(f"validation data folder not found: {cfg.val_data}")
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise MobileNetError(f"pretrained checkpoint not found: {cfg.pretrained}")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MobileNetError(f"--out {out} exists and is not a folder")
    if not cfg.resume and (out / "last.pt").exists():
        raise MobileNetError(
            f"{out} already holds a run (last.pt): pass --resume to continue it, "
            "or choose another --out"
        )


def _datasets(cfg: TrainConfig, eval_config: EvalConfig) -> Split:
    # Transforms follow from the model's own evaluation config (mean, std, crop ratio).
    res, aug = cfg.recipe.resolution, cfg.recipe.augment
    train_tf = train_transform(res, aug, eval_config)
    eval_tf = eval_transform(res, eval_config)
    if cfg.data in BUILTIN:
        return builtin_splits(cfg.data, train_tf, eval_tf)
    return folder_splits(cfg.data, cfg.val_data, cfg.val_fraction, train_tf, eval_tf, cfg.seed)


def _loader(dataset, batch_size, sampler, workers, generator, drop_last) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        worker_init_fn=one_thread_worker if workers else None,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
    )


def build_model(cfg: TrainConfig) -> MobileNet:
    """The network without its classifier (the caller adds one for the data's classes)."""
    recipe = cfg.recipe
    kwargs: dict[str, Any] = {"width_mult": cfg.width_mult, "num_classes": 0}
    if recipe.dropout is not None:
        kwargs["dropout"] = recipe.dropout
    model = create_model(cfg.model, **kwargs)
    if cfg.pretrained:
        # Start from any checkpoint load_weights accepts; its classifier is replaced by
        # one for the dataset's classes afterwards.
        from ..weights import infer_num_classes, read_checkpoint

        state_dict, metadata = read_checkpoint(cfg.pretrained)
        source_classes = infer_num_classes(state_dict)
        model.reset_classifier(source_classes)
        load_weights(model, state_dict, source_name=cfg.pretrained, metadata=metadata)
    if recipe.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = recipe.bn_momentum
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _save_best(model, path: Path, cfg: TrainConfig, epoch: int, val) -> None:
    metadata = {
        "classes": json.dumps(cfg.classes),
        "resolution": str(cfg.recipe.resolution),
        "epoch": str(epoch),
        "data": cfg.data,
    }
    if val is not None:
        metadata["val_top1"] = f"{val['top1']:.4f}"
    save_weights(model, path, metadata)


def _progress(loader, epoch: int, cfg: TrainConfig):
    from tqdm.auto import tqdm

    return tqdm(
        loader, desc=f"epoch {epoch + 1}/{cfg.recipe.epochs}", leave=False, dynamic_ncols=True
    )


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
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
