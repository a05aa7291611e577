"""Quantization-aware training: a classification run on the engine that writes int8.

The trained float classifier gets PyTorch's x86 fake quantization (FX graph mode,
:func:`mobilenet.export.int8.prepare_fx_int8`) and is fine-tuned on the user's images by
:func:`mobilenet.train.engine.fit`, like every other training run: one folder per run
(locked), ``metrics.csv``, progress, an EMA of the weights if asked, and ``--resume`` that
continues exactly. As torchvision's QAT reference does, BatchNorm statistics are frozen
from ``freeze_bn_epoch`` on and the quantization ranges from ``freeze_observer_epoch`` on.

Each evaluation converts a copy of the network to int8 and scores *that* on the held-out
images (a built-in set's held-out split, or ``val_fraction`` of a folder): the best epoch
is the best int8 model, and ``best.safetensors`` is that int8 model (the PyTorch int8
format, :mod:`mobilenet.export.int8_file`).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..deployed import Trained
from ..errors import MobileNetError
from ..export.calibration import calibration_dataset
from ..export.int8 import Int8Model, convert_fx_int8, prepare_fx_int8, x86_backend
from ..export.int8_file import save_int8
from ..fileio import write_bytes
from ..models import MobileNet
from ..train.distributed import Distributed
from ..train.engine import FitResult, RunConfig, Setup, fit
from ..train.evaluate import ShardSampler, evaluate
from ..train.plot import plot_curves
from ..train.recipes import Recipe

__all__ = ["QATConfig", "QATTask", "quantize_aware", "run_folder_of"]


@dataclass
class QATConfig:
    """Quantization-aware fine-tuning of trained float weights (one run folder)."""

    data: str  # the fine-tuning images: a folder or a built-in set
    out: Path  # the run folder
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3  # SGD (Nesterov momentum), cosine-decayed to 0 over the fine-tuning
    momentum: float = 0.9
    weight_decay: float = 1e-5  # none on BatchNorm and biases
    freeze_bn_epoch: int = 1  # BatchNorm statistics frozen from this epoch (0-based) on
    freeze_observer_epoch: int = 2  # quantization ranges frozen from this epoch on
    ema_decay: float | None = None
    val_fraction: float = 0.1  # of a folder, held out to score the int8 model
    seed: int = 0
    workers: int = 0
    device: str = "cpu"  # fake quantization trains here; the int8 model runs on the CPU
    amp: bool = False
    resume: bool = False
    progress: bool = True
    grad_accum_steps: int = 1  # batches per optimizer step
    compile: bool = False  # the training step through torch.compile
    eval_every: int = 1

    def recipe(self, resolution: int) -> Recipe:
        return Recipe(
            name="qat",
            epochs=self.epochs,
            batch_size=self.batch_size,
            optimizer="sgd",
            lr=self.lr,
            lr_batch=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            norm_weight_decay=False,
            schedule="cosine",
            ema_decay=self.ema_decay,
            resolution=resolution,
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


class QATTask:
    """The engine's task for quantization-aware training of one trained classifier."""

    name = "qat"
    stats = ("loss", "top1")
    metrics = ("loss", "top1", "top5")
    primary = "top1"

    def __init__(self, trained: Trained, cfg: QATConfig) -> None:
        if not isinstance(trained.model, MobileNet):
            raise MobileNetError(f"{trained.path} is already exported: train its float weights")
        if min(cfg.freeze_bn_epoch, cfg.freeze_observer_epoch) < 0:
            raise MobileNetError("QAT's freeze epochs must be >= 0")
        if not 0 <= cfg.val_fraction < 1:
            raise MobileNetError(f"validation fraction must be in [0, 1), got {cfg.val_fraction}")
        self.trained, self.cfg = trained, cfg
        self.val_loader: DataLoader | None = None

    def setup(self, dist: Distributed) -> Setup:
        if dist.device.type != "cpu":
            raise MobileNetError("quantization-aware training runs on the CPU (--device cpu)")
        train, val = _datasets(self.trained, self.cfg)
        if val is not None:
            self.val_loader = DataLoader(
                val,
                batch_size=2 * self.cfg.batch_size // dist.world_size,
                sampler=ShardSampler(val, dist.rank, dist.world_size),
            )
        with x86_backend():
            model = prepare_fx_int8(self.trained.model, "qat", self.trained.resolution)
        return Setup(
            model,
            train,
            validates=val is not None,
            start_epoch=self.start_epoch,
            save=self.save,
        )

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        from torch.ao.nn.intrinsic.qat import freeze_bn_stats
        from torch.ao.quantization import disable_observer

        if epoch >= self.cfg.freeze_bn_epoch:
            model.apply(freeze_bn_stats)
        if epoch >= self.cfg.freeze_observer_epoch:
            model.apply(disable_observer)

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        images, targets = batch
        logits = model(images.to(device))
        targets = targets.to(device)
        loss = F.cross_entropy(logits, targets)
        top1 = 100 * (logits.argmax(1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "top1": top1}, len(targets)

    def int8(self, model: nn.Module) -> Int8Model:
        """The int8 network of the fine-tuned one (a converted copy; ``model`` trains on)."""
        with x86_backend():
            net = convert_fx_int8(copy.deepcopy(model).cpu())
        return Int8Model(net, self.trained.model.config, "qat")

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        assert self.val_loader is not None
        int8 = self.int8(model)
        with x86_backend(), torch.inference_mode():
            metrics = evaluate(int8, self.val_loader, dist, channels_last=False)
        return {k: metrics[k] for k in self.metrics}

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        extra = {"qat_epoch": str(epoch), "qat_data": self.cfg.data}
        if val is not None:
            extra["val_top1"] = f"{val['top1']:.4f}"
        return self.trained.model_card().replace(extra=extra).metadata()

    def save(self, model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
        from ..card import ModelCard

        save_int8(self.int8(model), path, ModelCard.read(metadata, str(path)))

    def config(self) -> dict[str, Any]:
        return {"qat": self.cfg.to_dict(), "weights": str(self.trained.path)}

    def epoch_line(self, row: dict[str, Any], epochs: int) -> str:
        val = (
            f"  int8 val loss {row['val_loss']:.4f}  int8 val top-1 {row['val_top1']:.2f}%"
            if row["val_loss"] is not None
            else ""
        )
        return (
            f"QAT epoch {row['epoch']}/{epochs}  lr {row['lr']:.2e}  train loss "
            f"{row['train_loss']:.4f}  train top-1 {row['train_top1']:.2f}%{val}"
        )

    def plot(self, history: list[dict[str, Any]], path: Path) -> None:
        plot_curves(history, path, f"QAT of {self.trained.path} on {self.cfg.data}")


def run_folder_of(out: str | Path) -> Path:
    """Where ``quantize --method qat --out FILE`` trains by default: ``FILE`` without its
    suffix, plus ``.qat`` (``int8.safetensors`` -> ``int8.qat/``)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.qat")


def quantize_aware(trained: Trained, cfg: QATConfig, out: str | Path) -> FitResult:
    """Fine-tune ``trained`` with fake quantization in the run folder ``cfg.out`` and write
    the best epoch's int8 model to ``out`` (PyTorch int8 safetensors)."""
    out = Path(out)
    if out.is_dir():
        raise MobileNetError(f"--out {out} is a folder: name the int8 file to write")
    if out.resolve() == Path(cfg.out).resolve():
        raise MobileNetError(f"--out {out} is the QAT run folder: choose another --run")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise MobileNetError(f"--run {cfg.out} exists and is not a folder")
    task = QATTask(trained, cfg)
    run = RunConfig.of(cfg, cfg.recipe(trained.resolution), channels_last=False)
    result = fit(task, run)
    best = Path(cfg.out) / "best.safetensors"
    if not best.is_file():
        raise MobileNetError(f"QAT in {cfg.out} saved no int8 model")
    write_bytes(out, best.read_bytes())
    return result


def _datasets(trained: Trained, cfg: QATConfig) -> tuple[Dataset, Dataset | None]:
    """The fine-tuning images, preprocessed as ``eval`` does, and the held-out ones."""
    from ..data.datasets import BUILTIN, builtin_splits

    images = calibration_dataset(trained, cfg.data)
    if cfg.data in BUILTIN:
        transform = trained.eval_preprocess().transform()
        return images, builtin_splits(cfg.data, transform, transform).val
    if not cfg.val_fraction:
        return images, None
    n = len(images)  # type: ignore[arg-type]
    n_val = max(1, round(cfg.val_fraction * n))
    if n_val >= n:
        raise MobileNetError(f"{cfg.data}: too few images ({n}) to hold out {cfg.val_fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    transform = trained.eval_preprocess().transform()
    subset = images.subset  # type: ignore[attr-defined]
    return subset(order[n_val:], transform), subset(order[:n_val], transform)
