"""The training engine: one fit loop for every task. Read it top to bottom in :func:`fit`.

A task (classification, detection, ...) says *what* to train through the small
:class:`Task` interface: its model and training data, the loss of a batch, how to
evaluate, which validation metric is its primary score, what to store with the best
weights. The engine owns *how*: one process or many under ``torchrun``
(DistributedDataParallel, each process on its shard of every global batch), AMP with a
GradScaler, the weight EMA, the per-step schedule, the NaN/Inf stop, progress bars, the
run folder (``config.json``, ``metrics.csv``, TensorBoard, ``curves.png``,
``best.safetensors``, ``last.pt``, ``summary.json``), and exact resume.

Determinism: the data order, the augmentations and dropout of epoch ``e`` depend only on
``(seed, e)`` (the sampler, the loader's generator and the global RNG are re-seeded at the
start of every epoch), and ``last.pt`` holds everything else (weights, optimizer,
schedule, scaler, EMA, best score) as of the end of an epoch. So ``--resume`` after an
interruption anywhere continues exactly as if the run had never stopped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler

from ..errors import MobileNetError
from ..weights import save_weights
from . import checkpoint as ckpt
from .cpu import keep_freed_memory, one_thread_worker
from .distributed import Distributed, setup
from .recipes import Recipe
from .run_folder import RunFolder, check_resume, claim, plain
from .sampler import RepeatedAugmentationSampler
from .state import State

__all__ = ["FitResult", "RunConfig", "Setup", "Task", "TrainingDiverged", "fit"]


# Far above any recipe's rate (0.01-0.5); beyond it float32 arithmetic overflows at once.
MAX_LR = 100.0


class TrainingDiverged(MobileNetError):
    """The loss became NaN or infinite."""


@dataclass
class RunConfig:
    """How to run: the engine's settings, the same for every task."""

    out: Path  # the run folder
    recipe: Recipe  # epochs, global batch size, optimizer, schedule, EMA
    lr: float | None = None  # absolute learning rate; default: the recipe's, batch-scaled
    seed: int = 0
    workers: int = 2  # data loading processes per training process
    device: str = "auto"
    amp: bool = False  # mixed precision (CUDA)
    channels_last: bool = True  # NHWC weights: depthwise convolutions run faster in it
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    resume: bool = False
    progress: bool = True
    # Gradients of this many batches are summed before each optimizer step: the effective
    # batch (the learning rate's scaling, the schedule's steps, EMA updates) is N x batch.
    grad_accum_steps: int = 1
    compile: bool = False  # the training step through torch.compile

    @classmethod
    def of(
        cls, task_config: Any, recipe: Recipe, lr: float | None = None, channels_last: bool = True
    ) -> RunConfig:
        """The engine's settings of a task's training config: its ``out``, ``seed``,
        ``workers``, ``device``, ``amp``, ``eval_every``, ``resume``, ``progress``,
        ``grad_accum_steps`` and ``compile``."""
        c = task_config
        return cls(
            c.out,
            recipe,
            lr,
            c.seed,
            c.workers,
            c.device,
            c.amp,
            channels_last,
            c.eval_every,
            c.resume,
            c.progress,
            c.grad_accum_steps,
            c.compile,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings but the recipe (``config.json`` holds it on its own)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}
        return {**d, "out": str(self.out)}


@dataclass
class Setup:
    """What a task builds for a run: the model and the training data."""

    model: nn.Module
    train_set: Dataset
    collate: Callable[[list[Any]], Any] | None = None
    validates: bool = True  # False: no held-out data (the best epoch has the lowest loss)
    # Called with the model before each epoch's training (e.g. quantization-aware training
    # freezes BatchNorm statistics, then the quantization ranges, from a given epoch on):
    # a function of the epoch alone, so a resumed run calls it as the uninterrupted one did.
    start_epoch: Callable[[nn.Module, int], None] | None = None
    # Writes the best weights (the evaluated network, the path, ``Task.metadata``); by
    # default float safetensors (:func:`mobilenet.weights.save_weights`).
    save: Callable[[nn.Module, Path, dict[str, str]], Any] = save_weights


class Task(Protocol):
    """What a task adds to the engine."""

    name: str  # "classification", "detection", ...
    stats: tuple[str, ...]  # training statistics of a batch, e.g. ("loss", "top1")
    metrics: tuple[str, ...]  # validation metrics, e.g. ("loss", "top1", "top5")
    primary: str  # the metric that selects the best weights (higher is better)

    def setup(self, dist: Distributed) -> Setup: ...

    def loss(
        self, model: nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss to minimise, batch means of ``stats``, batch size)."""
        ...

    def evaluate(self, model: nn.Module, dist: Distributed) -> dict[str, float] | None:
        """``metrics`` on the held-out data (None where this process does not evaluate)."""
        ...

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        """Stored with the best weights (class names, data, scores)."""
        ...

    def config(self) -> dict[str, Any]:
        """The task's settings, written to ``config.json`` and ``last.pt``."""
        ...

    def epoch_line(self, row: dict[str, Any], epochs: int) -> str: ...

    def plot(self, history: list[dict[str, Any]], path: Path) -> None: ...


@dataclass
class FitResult:
    best_epoch: int | None
    best_val: dict[str, float] | None  # validation metrics of the best epoch
    final: dict[str, Any]  # the last epoch's row of metrics.csv
    seconds: float
    out: Path


def fit(task: Task, run: RunConfig) -> FitResult:
    """Train ``task`` as ``run`` says; returns where the run folder is and its best epoch."""
    start = time.perf_counter()
    check_run(run)
    out = Path(run.out)
    dist = setup(run.device)
    if dist.device.type == "cpu":
        keep_freed_memory()  # see mobilenet.train.cpu: fewer page faults per step
    try:
        _check_processes(run, dist)
        # One run per folder (a lock); a run that fails before its first epoch is saved
        # removes the folder it created.
        with claim(out, dist.is_main):
            resumed = ckpt.load_last(out / "last.pt") if run.resume else None
            torch.manual_seed(run.seed)
            built = task.setup(dist)
            settings = plain(
                {
                    "task": task.name,
                    **task.config(),
                    "recipe": run.recipe.to_dict(),
                    "run": run.to_dict(),
                }
            )
            if resumed is not None:
                check_resume(resumed.get("config"), settings, resumed.get("epoch", 0))
            loader = train_loader(built, run, dist)
            steps = len(loader) // run.grad_accum_steps  # optimizer steps per epoch
            state = State(
                built.model,
                run.recipe,
                run.lr,
                run.amp,
                run.channels_last,
                dist,
                steps,
                run.grad_accum_steps,
                run.compile,
            )
            if resumed is not None:
                state.restore(resumed)
            return _epochs(task, run, dist, built, loader, state, settings, start)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise MobileNetError(
            f"a data loading process died ({str(e).splitlines()[0]}); continue from the "
            f"last saved epoch with --resume"
        ) from None
    finally:
        dist.close()


def _check_processes(run: RunConfig, dist: Distributed) -> None:
    if run.amp and dist.device.type != "cuda":
        raise MobileNetError("--amp needs a CUDA device")
    batch = run.recipe.batch_size
    if batch % dist.world_size:
        raise MobileNetError(f"batch size {batch} is not divisible by {dist.world_size} processes")
    if batch // dist.world_size < 2:
        raise MobileNetError(
            f"batch size {batch} gives {batch // dist.world_size} image per process: "
            "BatchNorm needs at least 2"
        )


def _epochs(
    task: Task,
    run: RunConfig,
    dist: Distributed,
    built: Setup,
    loader: DataLoader,
    state: State,
    settings: dict[str, Any],
    start: float,
) -> FitResult:
    out, epochs = Path(run.out), run.recipe.epochs
    log = None
    if dist.is_main:
        config = {**settings, "lr": state.lr, "world_size": dist.world_size}
        log = RunFolder(out, config, task.plot, task.metrics)
    for epoch in range(state.epoch, epochs):
        seed = run.seed * 100_003 + epoch
        torch.manual_seed(seed)
        streaming = isinstance(loader.dataset, IterableDataset)
        (loader.dataset if streaming else loader.sampler).set_epoch(epoch)  # type: ignore[union-attr]
        loader.generator.manual_seed(seed)  # type: ignore[union-attr]
        if built.start_epoch is not None:
            built.start_epoch(state.model, epoch)
        stats = _train_one_epoch(task, state, loader, dist, run, epoch)
        _report_skipped(loader.dataset, dist)
        # Each process updated its BatchNorm statistics on its own shard: average them,
        # so every replica (and its EMA) evaluates and saves the same network.
        dist.average_buffers(state.model)
        if state.ema is not None:
            dist.average_buffers(state.ema.module)
        due = (epoch + 1) % run.eval_every == 0 or epoch + 1 == epochs
        val = task.evaluate(state.evaluated, dist) if built.validates and due else None
        row = _row(task, epoch + 1, stats, val)
        state.history.append(row)
        score = val[task.primary] if val is not None else None
        if not built.validates:
            score = -stats["loss"]
        improved = score is not None and (state.best_score is None or score > state.best_score)
        if improved:
            state.best_score, state.best_epoch, state.best_val = score, epoch + 1, val
        if log is not None:
            if improved:
                metadata = task.metadata(epoch + 1, val)
                built.save(state.evaluated, out / "best.safetensors", metadata)
            log.epoch(row, state.history)
            ckpt.save_last(out / "last.pt", state.checkpoint(epoch + 1, settings))
            if run.progress:
                print(task.epoch_line(row, epochs), flush=True)
        dist.barrier()

    checksums = dist.replica_checksums(state.model)
    seconds = time.perf_counter() - start
    if log is not None:
        # One checksum per process: DistributedDataParallel keeps the replicas equal.
        summary = {"seconds": seconds, "world_size": dist.world_size}
        summary["replica_checksums"] = checksums
        log.close(state.history, state.best_epoch, state.best_val, summary)
    final = state.history[-1] if state.history else {}
    return FitResult(state.best_epoch, state.best_val, final, seconds, out)


def _train_one_epoch(
    task: Task,
    state: State,
    loader: DataLoader,
    dist: Distributed,
    run: RunConfig,
    epoch: int,
) -> dict[str, float]:
    state.ddp.train()
    totals = torch.zeros(len(task.stats) + 1, dtype=torch.float64)  # sums of stats, samples
    lr = max(group["lr"] for group in state.optimizer.param_groups)
    start = time.perf_counter()
    # Whole accumulated steps only: the batches after the last one are not drawn.
    accumulate = run.grad_accum_steps
    batches = len(loader) // accumulate * accumulate
    bar = None
    if dist.is_main and run.progress:
        bar = _progress(loader, epoch, run.recipe.epochs, batches)
    for step, batch in enumerate(bar if bar is not None else loader):
        if step == batches:
            break
        last = (step + 1) % accumulate == 0
        with state.sync(last), torch.autocast(dist.device.type, enabled=run.amp):
            loss, stats, n = task.loss(state.forward, batch, dist.device)
        finite = dist.all_reduce(torch.isfinite(loss.detach()).to(torch.int32), "min")
        if not bool(finite):
            raise TrainingDiverged(
                f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; "
                f"stopped. The last good checkpoint is {Path(run.out) / 'last.pt'} "
                "(try a lower --lr)"
            )
        with state.sync(last):
            state.backward(loss / accumulate if accumulate > 1 else loss)
        if last:
            lr = state.update()
        totals += torch.tensor([*(stats[k] * n for k in task.stats), n], dtype=torch.float64)
        if bar is not None:
            means = {k: f"{totals[i] / totals[-1]:.3g}" for i, k in enumerate(task.stats)}
            speed = totals[-1] * dist.world_size / (time.perf_counter() - start)
            bar.set_postfix(**means, img_s=f"{speed:.1f}")
    seconds = time.perf_counter() - start
    totals = dist.all_reduce(totals.to(dist.device)).cpu()
    n = totals[-1].item()
    means = {k: totals[i].item() / n for i, k in enumerate(task.stats)}
    return {**means, "lr": lr, "images_per_s": n / seconds, "seconds": seconds}


# --------------------------------------------------------------------------- helpers


def check_run(run: RunConfig) -> None:
    """Refuse settings no task can train with, before anything is built or written."""
    r = run.recipe
    if r.epochs <= 0:
        raise MobileNetError(f"epochs must be positive, got {r.epochs}")
    if r.batch_size <= 0:
        raise MobileNetError(f"batch size must be positive, got {r.batch_size}")
    if r.resolution < 32:
        raise MobileNetError(f"resolution must be >= 32, got {r.resolution}")
    if run.lr is not None and not 0 < run.lr <= MAX_LR:
        raise MobileNetError(f"learning rate must be > 0 and <= {MAX_LR:g}, got {run.lr:g}")
    if not (r.weight_decay >= 0 and math.isfinite(r.weight_decay)):
        raise MobileNetError(f"weight decay must be >= 0, got {r.weight_decay}")
    if not (r.warmup_epochs >= 0 and math.isfinite(r.warmup_epochs)):
        raise MobileNetError(f"warm-up epochs must be >= 0, got {r.warmup_epochs}")
    if r.ema_decay is not None and not 0 < r.ema_decay < 1:
        raise MobileNetError(f"EMA decay must be in (0, 1), got {r.ema_decay}")
    if run.workers < 0:
        raise MobileNetError(f"workers must be >= 0, got {run.workers}")
    if run.eval_every <= 0:
        raise MobileNetError(f"eval_every must be positive, got {run.eval_every}")
    if run.grad_accum_steps <= 0:
        raise MobileNetError(f"--grad-accum-steps must be >= 1, got {run.grad_accum_steps}")
    check_recipe(r)
    out = Path(run.out)
    if out.exists() and not out.is_dir():
        raise MobileNetError(f"--out {out} exists and is not a folder")
    if not run.resume and (out / "last.pt").exists():
        raise MobileNetError(
            f"{out} already holds a run (last.pt): pass --resume to continue it, "
            "or choose another --out"
        )


def train_loader(built: Setup, run: RunConfig, dist: Distributed) -> DataLoader:
    """Each process takes its shard of every global batch, in an order set per epoch.

    A map-style dataset is sharded by a DistributedSampler. A streaming dataset (an
    ``IterableDataset``, e.g. tar shards) shards itself across processes and workers: it
    has ``set_epoch(epoch)`` for the epoch's order and a ``__len__`` that is the number
    of samples this process yields per epoch, the same on every process.
    """
    streaming = isinstance(built.train_set, IterableDataset)
    repeats = run.recipe.aug_repeats
    sampler: Sampler[int] | None = None
    if streaming and repeats > 1:
        raise MobileNetError(
            "--aug-repeats needs an image folder or a built-in set: tar shards stream "
            "each image once"
        )
    if repeats > 1:
        size = len(built.train_set)  # type: ignore[arg-type]
        sampler = RepeatedAugmentationSampler(size, dist.world_size, dist.rank, repeats, run.seed)
    elif not streaming:
        sampler = DistributedSampler(
            built.train_set, dist.world_size, dist.rank, shuffle=True, seed=run.seed, drop_last=True
        )
    loader = DataLoader(
        built.train_set,
        batch_size=run.recipe.batch_size // dist.world_size,
        sampler=sampler,
        num_workers=run.workers,
        collate_fn=built.collate,
        generator=torch.Generator(),
        worker_init_fn=one_thread_worker if run.workers else None,
        drop_last=True,
        pin_memory=dist.device.type == "cuda",
    )
    if len(loader) < run.grad_accum_steps:
        effective = run.recipe.batch_size * run.grad_accum_steps
        what = "batch" if run.grad_accum_steps == 1 else "effective batch"
        raise MobileNetError(
            f"{len(built.train_set)} training images: fewer than one {what} of "  # type: ignore[arg-type]
            f"{effective}; lower --batch-size"
            + ("" if run.grad_accum_steps == 1 else " or --grad-accum-steps")
        )
    return loader


def check_recipe(r: Recipe) -> None:
    """Refuse recipe settings the engine applies, in one line naming the flag."""
    if r.aug_repeats < 1:
        raise MobileNetError(f"--aug-repeats must be >= 1, got {r.aug_repeats}")
    if r.layer_decay is not None and not 0 < r.layer_decay <= 1:
        raise MobileNetError(f"--layer-decay must be in (0, 1], got {r.layer_decay}")


def _row(
    task: Task, epoch: int, stats: dict[str, float], val: dict[str, float] | None
) -> dict[str, Any]:
    """One line of metrics.csv: the same columns every epoch."""
    return {
        "epoch": epoch,
        "lr": stats["lr"],
        **{f"train_{k}": stats[k] for k in task.stats},
        **{f"val_{k}": val[k] if val is not None else None for k in task.metrics},
        "images_per_s": stats["images_per_s"],
        "epoch_seconds": stats["seconds"],
    }


def _report_skipped(dataset: Any, dist: Distributed) -> None:
    """One line per epoch when training files failed to decode (a dataset that skips such
    files says which through ``skipped`` / ``skipped_line()``), counted over all ranks."""
    if not hasattr(dataset, "skipped"):
        return
    count = dist.all_reduce(torch.tensor([len(dataset.skipped)], device=dist.device))
    if dist.is_main and int(count.item()):
        line = dataset.skipped_line() or f"{int(count.item())} unreadable image(s) skipped"
        print(f"warning: {line}", file=sys.stderr, flush=True)


def _progress(loader: DataLoader, epoch: int, epochs: int, total: int):
    """A bar over the epoch's batches on a terminal; none where stderr is a file or a
    pipe (``disable=None``), whose log keeps the one line per epoch printed after it."""
    from tqdm.auto import tqdm

    desc = f"epoch {epoch + 1}/{epochs}"
    return tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=None)
