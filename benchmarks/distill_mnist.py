"""Distillation on few digits: does a teacher lift a small student trained on 500 MNIST digits?

The student, mobilenet_v3_small at width 0.35, trains on 500 of the built-in ``mnist``
training digits (50 per class, drawn once with ``--subset-seed`` from the 4,000 training
digits of ``builtin_splits("mnist", ...)``), written as an image folder; it is scored on
the 1,000 held-out digits of the same split, written as a folder too (``--val-data``).
Each seed trains it twice, alike in everything (recipe, epochs, seed, data) but one: with
no teacher, and with a mobilenet_v3_large teacher (``--teacher``) trained once, by this
script, on all 4,000 training digits with the ``demo`` recipe. All runs go through
:func:`mobilenet.classification.task.train`, as ``mobilenet train`` does.

A setting is ``EPOCHS,KD_ALPHA,KD_TEMPERATURE[,MIXUP]`` (the student's epochs, and the
mixup alpha of both arms; the demo recipe otherwise); ``--setting`` may be given more
than once, and ``--add`` keeps the settings already recorded (each says its command).
Top-1 is reported both at the last epoch (no choice made on the held-out digits: the
figure to compare) and at the best epoch (what ``best.safetensors`` keeps, chosen on
those same digits).

    python benchmarks/distill_mnist.py [--setting 8,0.5,4 [--setting ...]] [--seeds 0 1 2]
        [--threads 1] [--work DIR] [--add]

With ``--work DIR`` the folders and the teacher are kept there, and a teacher found there
is reused (the record says so) rather than trained again.

The runs use one thread unless ``--threads`` says otherwise: top-1 does not depend on
it beyond float rounding, and on a machine shared with other work one thread keeps its
pace where two threads on two busy cores stall at every parallel section (a student run
of 13 s took 200 s so).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mobilenet.classification.task import TrainConfig, train
from mobilenet.data import builtin_splits
from mobilenet.machine import cpu, load_snapshot, machine, others_since
from mobilenet.train import get_recipe

STUDENT, WIDTH = "mobilenet_v3_small", 0.35
TEACHER = "mobilenet_v3_large"
RECIPE = "demo"


def write_folders(work: Path, per_class: int, seed: int) -> tuple[Path, Path]:
    """The class-balanced training subset and the held-out digits, as image folders
    (``<root>/<class>/<index>.png``, the index into the built-in split)."""
    split = builtin_splits("mnist", lambda x: x, lambda x: x)
    train_set, held_out = split.train, split.val
    g = torch.Generator().manual_seed(seed)
    targets = torch.tensor(train_set.targets)
    chosen = []
    for c in range(len(split.classes)):
        of_class = torch.nonzero(targets == c).flatten()
        chosen += of_class[torch.randperm(len(of_class), generator=g)[:per_class]].tolist()
    subset, val = work / f"mnist-{per_class}-per-class-seed{seed}", work / "mnist-held-out"
    for root, images, labels, indices in (
        (subset, train_set.images, train_set.targets, sorted(chosen)),
        (val, held_out.images, held_out.targets, range(len(held_out))),
    ):
        if root.is_dir():
            continue
        for i in indices:
            folder = root / split.classes[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i][0].numpy(), mode="L").save(folder / f"{i:04d}.png")
    return subset, val


def train_teacher(work: Path, seed: int, epochs: int | None) -> dict[str, Any]:
    """The teacher on all 4,000 training digits (or the one an earlier run left in
    ``work``), with its held-out top-1."""
    out = work / "teacher"
    reused = (out / "summary.json").is_file()
    if not reused:
        recipe = get_recipe(RECIPE, epochs=epochs)
        train(TrainConfig(TEACHER, "mnist", out, recipe, seed=seed, workers=0, progress=False))
    summary = json.loads((out / "summary.json").read_text())
    return {
        "model": TEACHER,
        "data": "mnist (4,000 training digits)",
        "recipe": RECIPE,
        "seed": seed,
        "epochs": summary["final"]["epoch"],
        "weights": str(out / "best.safetensors"),
        "final_top1": summary["final"]["val_top1"],
        "best_top1": summary["best_val_top1"],
        "best_epoch": summary["best_epoch"],
        "train_seconds": round(summary["seconds"], 1),
        "reused_from_an_earlier_run": reused,
    }


def held_out_top1(weights: str, folder: Path) -> float:
    """``mobilenet eval`` of a checkpoint on an image folder: its top-1."""
    command = [sys.executable, "-m", "mobilenet", "eval", "--weights", weights, "--json"]
    out = subprocess.run(
        [*command, "--data", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout)["top1"])


def student(
    data: Path, val: Path, out: Path, seed: int, setting: tuple[int, float, float], teacher
) -> dict[str, Any]:
    """One student run; ``teacher``: the teacher's weights, or None."""
    epochs, alpha, temperature, mixup = setting
    recipe = get_recipe(
        RECIPE, epochs=epochs, kd_alpha=alpha, kd_temperature=temperature, mixup=mixup
    )
    cfg = TrainConfig(
        STUDENT,
        str(data),
        out,
        recipe,
        width_mult=WIDTH,
        val_data=str(val),
        seed=seed,
        workers=0,
        progress=False,
        teacher=teacher,
    )
    window = load_snapshot()
    result = train(cfg)
    busy = others_since(window)
    return {
        "seed": seed,
        "teacher": teacher is not None,
        "final_top1": result.final["val_top1"],
        "best_top1": result.best_top1,
        "best_epoch": result.best_epoch,
        "seconds": round(result.seconds, 1),
        "teacher_ms_per_batch": result.final.get("train_teacher_ms"),
        "busy_other_cores": None if busy is None else round(busy, 3),
    }


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 3),
        "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def arms(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Both arms' spread of ``key`` and the teacher's gain (mean, and per seed)."""
    plain = {r["seed"]: r[key] for r in runs if not r["teacher"]}
    taught = {r["seed"]: r[key] for r in runs if r["teacher"]}
    gains = [taught[s] - plain[s] for s in plain]
    return {
        "without_teacher": spread(list(plain.values())),
        "with_teacher": spread(list(taught.values())),
        "gain": round(statistics.mean(taught.values()) - statistics.mean(plain.values()), 3),
        "gain_per_seed": {str(s): round(g, 2) for s, g in zip(plain, gains, strict=True)},
    }


def run_setting(args, setting, subset: Path, val: Path, teacher: str) -> dict[str, Any]:
    epochs, alpha, temperature, mixup = setting
    runs = []
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for seed in args.seeds:
            for taught in (None, teacher):
                out = Path(tmp) / f"seed{seed}-{'kd' if taught else 'plain'}"
                runs.append(student(subset, val, out, seed, setting, taught))
                r = runs[-1]
                print(
                    f"  epochs {epochs} alpha {alpha} T {temperature} mixup {mixup} seed {seed} "
                    f"teacher {r['teacher']}: "
                    f"final {r['final_top1']:.2f}  best {r['best_top1']:.2f}  {r['seconds']:.0f} s",
                    flush=True,
                )
    return {
        "date": datetime.date.today().isoformat(),
        "seconds": round(sum(r["seconds"] for r in runs), 1),  # the runs' training
        "epochs": epochs,
        "kd_alpha": alpha,
        "kd_temperature": temperature,
        "mixup": mixup,
        "final_top1": arms(runs, "final_top1"),
        "best_top1": arms(runs, "best_top1"),
        "runs": runs,
    }


def added_to(path: Path, teacher: dict[str, Any], settings: list[dict]) -> list[dict]:
    """The settings of the record at ``path`` (made with the same teacher, reused from
    ``--work``), then ``settings``; a setting measured again replaces the earlier one."""
    earlier = json.loads(path.read_text())
    same = ("final_top1", "train_seconds", "held_out_folder_top1")
    if any(earlier["teacher"].get(k) != teacher.get(k) for k in same):
        raise SystemExit(f"--add: {path} was made with another teacher (reuse its --work)")

    def key(s: dict) -> tuple:
        return s["epochs"], s["kd_alpha"], s["kd_temperature"], s.get("mixup", 0.0)

    new = {key(s) for s in settings}
    return [s for s in earlier["settings"] if key(s) not in new] + settings


def source_state() -> dict[str, Any]:
    """The commit measured and the files of ``src/`` changed since (read-only git calls)."""

    def git(*args: str) -> str:
        command = ["git", "--no-optional-locks", *args]
        out = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
        return out.stdout

    changed = git("status", "--porcelain", "--", "../src").splitlines()
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "uncommitted_src_changes": [line[3:] for line in changed],
    }


def setting(text: str) -> tuple[int, float, float, float]:
    """``EPOCHS,KD_ALPHA,KD_TEMPERATURE[,MIXUP]`` as numbers."""
    parts = text.split(",")
    if len(parts) not in (3, 4):
        raise SystemExit(f"--setting {text}: EPOCHS,KD_ALPHA,KD_TEMPERATURE[,MIXUP]")
    epochs, alpha, temperature, mixup = [*parts, "0"][:4]
    return int(epochs), float(alpha), float(temperature), float(mixup)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setting",
        action="append",
        help="EPOCHS,KD_ALPHA,KD_TEMPERATURE[,MIXUP] of the students (default: 8,0.5,4; "
        "MIXUP, the mixup alpha of both arms: 0, none)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--teacher-epochs", type=int, help="default: the recipe's")
    parser.add_argument("--work", type=Path, help="keep folders and the teacher here")
    parser.add_argument(
        "--threads", type=int, default=1, help="PyTorch threads (0: PyTorch's default)"
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the settings of the record at --json (same teacher: the same --work)",
    )
    args = parser.parse_args()
    texts = args.setting or ["8,0.5,4"]
    args.settings = [setting(text) for text in texts]
    return args


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    began, load, window = time.perf_counter(), os.getloadavg(), load_snapshot()
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        subset, val = write_folders(args.work, args.per_class, args.subset_seed)
        teacher = train_teacher(args.work, 0, args.teacher_epochs)
        teacher["held_out_folder_top1"] = held_out_top1(teacher["weights"], val)
        print(f"teacher: held-out top-1 {teacher['held_out_folder_top1']:.2f}", flush=True)
        settings = [run_setting(args, s, subset, val, teacher["weights"]) for s in args.settings]
    busy = others_since(window)
    teacher.pop("weights")
    command = " ".join(["python benchmarks/distill_mnist.py", *sys.argv[1:]])
    for s in settings:  # each setting says what made it (--add keeps earlier ones)
        s.update(command=command, source=source_state(), busy_other_cores_of_the_run=busy)
    if args.add:
        settings = added_to(args.json, teacher, settings)
    record = {
        "command": command,
        "machine": machine(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "source": source_state(),
        "threads": torch.get_num_threads(),
        "date": datetime.date.today().isoformat(),
        "student": {"model": STUDENT, "width_mult": WIDTH, "recipe": RECIPE},
        "data": {
            "train": f"{args.per_class} per class of mnist's 4,000 training digits "
            f"(subset seed {args.subset_seed})",
            "held_out": "mnist's 1,000 held-out digits",
        },
        "teacher": teacher,
        "settings": settings,
        "load_average_at_start": [round(v, 2) for v in load],
        "busy_other_cores": None if busy is None else round(busy, 3),
        "seconds": round(time.perf_counter() - began, 1),
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for s in settings:
        f = s["final_top1"]
        print(
            f"epochs {s['epochs']}, alpha {s['kd_alpha']}, T {s['kd_temperature']}, "
            f"mixup {s.get('mixup', 0.0)}: "
            f"without {f['without_teacher']['mean']:.2f} +- {f['without_teacher']['std']:.2f}, "
            f"with {f['with_teacher']['mean']:.2f} +- {f['with_teacher']['std']:.2f}, "
            f"gain {f['gain']:+.2f} points"
        )
    print(f"wrote {args.json} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
