"""The run folder: claimed by one run at a time, resumed only with the same settings, and
the files rank 0 writes into it (each atomically).

* **One run per folder.** A run holds an exclusive lock (``flock`` on ``.lock``) on its
  folder from start to end; a second run into the same ``--out`` is refused in one line.
  The kernel drops the lock when the process dies, so ``kill -9`` never leaves a stale
  one, and ``--resume`` works at once.
* **Resume with the same settings.** ``--resume`` compares the settings saved in
  ``last.pt`` with the new ones. Only :data:`MAY_CHANGE` may differ: more ``--epochs``
  stretches the schedule over the new total (the learning rate continues on the longer
  curve from the step reached; the result is then not what a run of the new length from
  the start would give), and the number of workers, the device, ``--eval-every`` and
  ``--quiet`` change nothing that is computed. Anything else is refused, naming it.
* **A failed start leaves nothing.** A run that fails before its first epoch is saved
  removes the folder it created (never a folder it found).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import MobileNetError
from . import checkpoint as ckpt

__all__ = ["MAY_CHANGE", "RunFolder", "check_resume", "claim", "plain"]

# Settings a resumed run may change (the last part of their key).
MAY_CHANGE = frozenset({"epochs", "workers", "device", "eval_every", "progress", "resume", "out"})
# Of those, the ones a user names as flags (--quiet stands for progress).
_FLAGS_THAT_MAY_CHANGE = "device, epochs, eval_every, workers and --quiet"
LOCK = ".lock"
# Settings added after runs were first written, with the value a run written before they
# existed trained with: a last.pt without them resumes as the run it is.
ADDED = {
    "grad_accum_steps": 1,
    "compile": False,
    "mixup": 0.0,
    "cutmix": 0.0,
    "mix_prob": 1.0,
    "switch_prob": 0.5,
    "drop_path": 0.0,
    "aug_repeats": 1,
    "layer_decay": None,
    "kd_alpha": 0.5,
    "kd_temperature": 1.0,
    "teacher": None,
    "teacher_model": None,
    "kd_features": 0.0,
    "bn_eps": None,
    "drop_path_flat": False,
}


@contextmanager
def claim(out: Path, main: bool) -> Iterator[None]:
    """Create and lock ``out`` for this run (rank 0; other ranks write nothing)."""
    if not main:
        yield
        return
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise MobileNetError(f"cannot create the run folder {out}: {e.strerror}") from None
    fd = _lock(out)
    try:
        yield
    except BaseException:
        if created and not (out / "last.pt").exists():
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        (out / LOCK).unlink(missing_ok=True)
        os.close(fd)


def _lock(out: Path) -> int:
    """The locked ``.lock`` of ``out``, holding this process id. A run that ends removes
    its ``.lock`` before closing it, so the file this process opened may be gone (or
    replaced by another run's) by the time its lock is granted: then it tries again with
    the file now at the path, so two runs never hold two different files."""
    while True:
        try:
            fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MobileNetError(f"cannot write to the run folder {out}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MobileNetError(
                    f"{out} is in use by another run (process {holder}): wait for it to "
                    "finish, or choose another --out"
                ) from None
            raise MobileNetError(f"cannot lock the run folder {out}: {e.strerror}") from None
        if _same_file(fd, out / LOCK):
            break
        os.close(fd)  # locked a file its run had just removed
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:  # removed since it was opened
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def plain(config: dict[str, Any]) -> dict[str, Any]:
    """Plain JSON values (a weights-only ``last.pt`` holds nothing else)."""
    return json.loads(json.dumps(config, default=str))


def check_resume(saved: dict[str, Any] | None, current: dict[str, Any], done: int) -> None:
    """Refuse to resume a run with settings that would change what it computes."""
    if saved is None:
        raise MobileNetError("last.pt holds no settings to compare with: start a new run")
    old, new = _flatten(saved), _flatten(current)
    for key in new.keys() - old.keys():
        name = key.rpartition(".")[2]
        if name in ADDED:
            old[key] = ADDED[name]
    changed = [
        key
        for key in sorted(old.keys() | new.keys())
        if key.rpartition(".")[2] not in MAY_CHANGE and old.get(key) != new.get(key)
    ]
    if changed:
        # A setting kept twice (the task's lr and the engine's) is named once.
        named = dict.fromkeys(
            f"{key.rpartition('.')[2]} {new.get(key)!r} (the run: {old.get(key)!r})"
            for key in changed
        )
        shown = ", ".join(list(named)[:4])
        more = f" and {len(named) - 4} more" if len(named) > 4 else ""
        raise MobileNetError(
            f"--resume with other settings: {shown}{more}; only {_FLAGS_THAT_MAY_CHANGE} may change"
        )
    epochs = current["recipe"]["epochs"]
    if epochs < done:
        raise MobileNetError(
            f"the run has trained {done} epochs already: --epochs {epochs} < {done}"
        )


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunFolder:
    """What rank 0 writes: config.json, metrics.csv, TensorBoard, curves.png, summary.json."""

    def __init__(self, out: Path, settings: dict[str, Any], plot, metrics: tuple[str, ...]) -> None:
        self.out, self.plot, self.metrics, self.name = out, plot, metrics, settings["task"]
        ckpt.write_json(out / "config.json", settings)
        self.tensorboard = _tensorboard(out)

    def epoch(self, row: dict[str, Any], history: list[dict[str, Any]]) -> None:
        ckpt.write_metrics(self.out / "metrics.csv", history)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "epoch" and value is not None:
                    self.tensorboard.add_scalar(key, value, row["epoch"])

    def close(
        self,
        history: list[dict[str, Any]],
        best_epoch: int | None,
        best_val: dict[str, float] | None,
        summary: dict[str, Any],
    ) -> None:
        if history:
            self.plot(history, self.out / "curves.png")
            best = best_val or {}
            summary = {
                "task": self.name,
                **{f"best_val_{k}": best.get(k) for k in self.metrics},
                "best_epoch": best_epoch,
                "final": history[-1],
                **summary,
            }
            ckpt.write_json(self.out / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
