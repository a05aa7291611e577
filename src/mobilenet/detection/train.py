"""Training an SSDLite detector: read it top to bottom in :func:`train_detector`.

The same run folder as classification training (``config.json``, ``metrics.csv``,
``curves.png``, ``best.safetensors``, ``last.pt``, ``summary.json``), the same
determinism (epoch ``e``'s data order and augmentation depend only on ``(seed, e)``, and
``last.pt`` holds everything else), so ``--resume`` continues exactly; one process, or
many under ``torchrun`` (DistributedDataParallel, each process on its shard of every
batch; rank 0 evaluates and writes).

Defaults: SGD with momentum 0.9, warm-up then cosine decay, weight decay 4e-5 without
decay on BatchNorm and biases (the TF and torchvision SSDLite recipes' optimizer; their
600-epoch COCO schedules are far longer than a demo needs), batch 32.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import MobileNetError
from ..models import create_model
from ..train import checkpoint as ckpt
from ..train.cpu import keep_freed_memory, one_thread_worker
from ..train.distributed import Distributed, setup
from ..train.loop import TrainingDiverged
from ..train.optim import param_groups, warmup_cosine
from ..train.plot import Panel, plot_panels
from ..weights import save_weights
from .data import BUILTIN_DETECTION, CocoDetection, collate, dataset_root, eval_transform
from .data import train_transform as detection_train_transform
from .evaluate import evaluate_detector
from .loss import LossConfig
from .model import SSDLite, check_box_scales

__all__ = ["DetectTrainConfig", "DetectTrainResult", "train_detector"]


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
    lr: float = 0.05
    weight_decay: float = 4e-5  # TF SSDLite configs: L2 4e-5
    warmup_epochs: float = 1.0
    focal: bool = False  # focal loss instead of hard negative mining
    augment: str = "ssd"  # ssd, light or none (see detection.data.train_transform)
    cache: bool = False  # decode and resize the training images once (light/none only)
    flip: bool | None = None  # horizontal flips; default: on, off for digits
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    resume: bool = False
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


@dataclass
class DetectTrainResult:
    best_map: float | None
    best_map_50: float | None
    best_epoch: int | None
    final: dict[str, Any]
    seconds: float
    out: Path


def train_detector(cfg: DetectTrainConfig) -> DetectTrainResult:
    start_time = time.perf_counter()
    _check_config(cfg)
    dist = setup(cfg.device)
    if dist.device.type == "cpu":
        keep_freed_memory()
    try:
        if cfg.batch_size % dist.world_size:
            raise MobileNetError(
                f"batch size {cfg.batch_size} is not divisible by {dist.world_size} processes"
            )
        out = Path(cfg.out)
        last_path, best_path = out / "last.pt", out / "best.safetensors"
        resumed = ckpt.load_last(last_path) if cfg.resume else None
        torch.manual_seed(cfg.seed)

        # ---- data: the training set fixes the classes; the model is built for them
        flip = cfg.flip if cfg.flip is not None else cfg.data != "mnist-det"
        train_set = CocoDetection(
            dataset_root(cfg.data, "train"),
            detection_train_transform(cfg.image_size, flip, cfg.augment),
        )
        if cfg.cache:
            train_set.cache_resized(cfg.image_size, threads=torch.get_num_threads())
        val_root = cfg.val_data or (
            str(dataset_root(cfg.data, "val")) if cfg.data in BUILTIN_DETECTION else None
        )
        val_set = (
            CocoDetection(dataset_root(val_root), eval_transform(), train_set.categories)
            if val_root is not None and dist.is_main
            else None
        )
        model: SSDLite = create_model(
            cfg.model,
            width_mult=cfg.width_mult,
            num_classes=len(train_set.categories) + 1,
            image_size=cfg.image_size,
            min_scale=cfg.min_scale,
            max_scale=cfg.max_scale,
        )
        model.loss_config = LossConfig(focal=cfg.focal)
        sampler = DistributedSampler(
            train_set, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        loader_gen = torch.Generator()
        loader = DataLoader(
            train_set,
            batch_size=cfg.batch_size // dist.world_size,
            sampler=sampler,
            num_workers=cfg.workers,
            collate_fn=collate,
            generator=loader_gen,
            worker_init_fn=one_thread_worker if cfg.workers else None,
            drop_last=True,
            persistent_workers=cfg.workers > 0,
        )
        steps_per_epoch = len(loader)
        if steps_per_epoch == 0:
            raise MobileNetError(
                f"{len(train_set)} training images: fewer than one batch of {cfg.batch_size}"
            )

        # ---- optimizer and schedule (per step: linear warm-up, then cosine to zero)
        # NHWC: depthwise convolutions train faster in it (about 1.25x on CPU)
        model.to(dist.device, memory_format=torch.channels_last)
        groups = param_groups(model, cfg.weight_decay, norm_weight_decay=False)
        if cfg.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                groups, cfg.lr, momentum=0.9, nesterov=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, cfg.lr)
        scheduler = LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step / steps_per_epoch, cfg.warmup_epochs, cfg.epochs),
        )
        ddp = (
            DistributedDataParallel(
                model, device_ids=[dist.device] if dist.device.type == "cuda" else None
            )
            if dist.enabled
            else model
        )

        first_epoch, history = 0, []
        best: dict[str, Any] = {"map": None, "map_50": None, "epoch": None}
        if resumed is not None:
            model.load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
            scheduler.load_state_dict(resumed["scheduler"])
            ckpt.set_rng_state(resumed["rng"])
            first_epoch, history, best = resumed["epoch"], resumed["history"], resumed["best"]

        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            config = {"train": cfg.to_dict(), "classes": train_set.classes}
            config["world_size"] = dist.world_size
            ckpt.write_json(out / "config.json", config)

        # ---- epochs
        for epoch in range(first_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed * 100_003 + epoch)
            sampler.set_epoch(epoch)
            loader_gen.manual_seed(cfg.seed * 100_003 + epoch)
            stats = _train_one_epoch(ddp, loader, optimizer, scheduler, dist, cfg, epoch)
            dist.average_buffers(model)
            val = None
            last_epoch = epoch + 1 == cfg.epochs
            if val_set is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
                val = evaluate_detector(model, val_set, batch_size=32)
            row = {
                "epoch": epoch + 1,
                "lr": stats["lr"],
                "train_loss": stats["loss"],
                "train_bbox_loss": stats["bbox_regression"],
                "train_cls_loss": stats["classification"],
                "val_map": val["map"] if val else None,
                "val_map_50": val["map_50"] if val else None,
                "images_per_s": stats["images_per_s"],
                "epoch_seconds": stats["seconds"],
            }
            history.append(row)
            improved = val is not None and (best["map"] is None or val["map"] > best["map"])
            if improved:
                best = {"map": val["map"], "map_50": val["map_50"], "epoch": epoch + 1}
            if dist.is_main:
                if improved or (val_set is None and last_epoch):
                    _save(model, best_path, cfg, train_set, epoch + 1, val)
                ckpt.write_metrics(out / "metrics.csv", history)
                ckpt.save_last(
                    last_path,
                    {
                        "epoch": epoch + 1,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": ckpt.rng_state(),
                        "history": history,
                        "best": best,
                        "config": json.loads(json.dumps(cfg.to_dict())),
                    },
                )
                if cfg.progress:
                    print(_epoch_line(row, cfg.epochs), flush=True)
            dist.barrier()

        checksums = dist.replica_checksums(model)
        if dist.is_main and history:
            plot_detection_curves(history, out / "curves.png", f"{cfg.model} on {cfg.data}")
            summary = {
                "best_val_map": best["map"],
                "best_val_map_50": best["map_50"],
                "best_epoch": best["epoch"],
                "final": history[-1],
                "seconds": time.perf_counter() - start_time,
                "world_size": dist.world_size,
                "replica_checksums": checksums,  # equal: the replicas hold the same network
            }
            ckpt.write_json(out / "summary.json", summary)
        return DetectTrainResult(
            best["map"],
            best["map_50"],
            best["epoch"],
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
    scheduler: LambdaLR,
    dist: Distributed,
    cfg: DetectTrainConfig,
    epoch: int,
) -> dict[str, float]:
    model.train()
    totals = torch.zeros(4, dtype=torch.float64)  # loss, box loss, class loss, images
    lr = optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    bar = None
    if dist.is_main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar if bar is not None else loader):
        images = [image.to(dist.device, non_blocking=True) for image in images]
        targets = [
            {
                "boxes": t["boxes"].as_subclass(torch.Tensor).to(dist.device),
                "labels": t["labels"].to(dist.device),
            }
            for t in targets
        ]
        losses = model(images, targets)
        loss = losses["bbox_regression"] + losses["classification"]
        finite = dist.all_reduce(torch.isfinite(loss.detach()).to(torch.int32), "min")
        if not bool(finite):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopped. "
                f"The last good checkpoint is {Path(cfg.out) / 'last.pt'} (try a lower --lr)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        n = len(images)
        totals += torch.tensor(
            [
                loss.item() * n,
                losses["bbox_regression"].item() * n,
                losses["classification"].item() * n,
                n,
            ],
            dtype=torch.float64,
        )
        if bar is not None:
            seconds = time.perf_counter() - start
            bar.set_postfix(
                loss=f"{totals[0] / totals[3]:.3f}",
                img_s=f"{totals[3] * dist.world_size / seconds:.1f}",
            )
    seconds = time.perf_counter() - start
    totals = dist.all_reduce(totals.to(dist.device)).cpu()
    loss, box, cls, n = totals.tolist()
    return {
        "loss": loss / n,
        "bbox_regression": box / n,
        "classification": cls / n,
        "lr": lr,
        "images_per_s": n / seconds,
        "seconds": seconds,
    }


def _check_config(cfg: DetectTrainConfig) -> None:
    if cfg.epochs <= 0:
        raise MobileNetError(f"epochs must be positive, got {cfg.epochs}")
    if cfg.batch_size <= 0:
        raise MobileNetError(f"batch size must be positive, got {cfg.batch_size}")
    if cfg.image_size < 32:
        raise MobileNetError(f"image size must be >= 32, got {cfg.image_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise MobileNetError(f"learning rate must be positive, got {cfg.lr}")
    check_box_scales(cfg.min_scale, cfg.max_scale)
    if cfg.optimizer not in ("sgd", "adamw"):
        raise MobileNetError(f"optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    if cfg.cache and cfg.augment == "ssd":
        raise MobileNetError(
            "caching resized images needs --augment light or none "
            "(SSD's zoom-out and crops work on the full-size images)"
        )
    if cfg.eval_every <= 0:
        raise MobileNetError(f"eval_every must be positive, got {cfg.eval_every}")
    dataset_root(cfg.data, "train")  # raises for a missing folder
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise MobileNetError(f"--out {out} exists and is not a folder")
    if not cfg.resume and (out / "last.pt").exists():
        raise MobileNetError(
            f"{out} already holds a run (last.pt): pass --resume to continue it, "
            "or choose another --out"
        )


def _save(
    model: SSDLite,
    path: Path,
    cfg: DetectTrainConfig,
    train_set: CocoDetection,
    epoch: int,
    val: dict[str, float] | None,
) -> None:
    metadata = {
        "task": "detection",
        "categories": json.dumps([{"id": c.id, "name": c.name} for c in train_set.categories]),
        "epoch": str(epoch),
        "data": cfg.data,
    }
    if val is not None:
        metadata["val_map"] = f"{val['map']:.4f}"
        metadata["val_map_50"] = f"{val['map_50']:.4f}"
    save_weights(model, path, metadata)  # type: ignore[arg-type]


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
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
