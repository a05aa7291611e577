"""Training throughput of ``mobilenet train --compile`` against the eager step.

What is timed is the engine itself: each variant runs :func:`mobilenet.train.fit` on the
classification task (its loss, label smoothing, AdamW of the ``demo`` recipe, the NaN/Inf
check, the schedule), with ``TrainConfig.compile`` off or on, and the images/s is the
engine's own figure for each epoch (``images_per_s`` of ``metrics.csv``). Only the data
are synthetic: a fixed random batch set in memory, 1,000 classes, so that no decoding
enters the time and an epoch is exactly ``--steps`` training steps.

Eager and compiled run in two processes of their own that take turns, one epoch each
(eager, compiled, eager, compiled, ...): the other one waits idle. The first
``--warmup`` epochs are not timed (the compiled variant compiles its forward and backward
in its first epoch; that epoch's time beyond its steps is the compile time, recorded
apart). Each worker measures how many cores other processes kept busy during each of its
epochs (:func:`mobilenet.machine.others_since`; during compilation that counts the
compiler's own worker processes too). Before each pair the script waits (at most
``--max-wait`` seconds) until other processes leave the cores idle; a pair in which
either epoch still had more than ``QUIET`` cores busy elsewhere is run again, up to
``--max-epochs``; the result is the median over the first ``--attempts`` undisturbed
pairs (over all timed pairs, flagged ``"undisturbed": false``, when there were not that
many). On a machine shared with other work, two threads on two cores slow down many
times over as soon as one core is taken; so the waiting.

    python benchmarks/train_compile.py [--models ...] [--resolutions 224 128]
        [--batch 32] [--steps 3] [--attempts 5] [--max-epochs 12] [--max-wait 60]
        [--device cpu|cuda] [--amp]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
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
from torch.utils.data import TensorDataset

from mobilenet.classification.task import ClassificationTask, TrainConfig, build_model
from mobilenet.machine import cores, cpu, free_cores, load_snapshot, machine, others_since
from mobilenet.train import Setup, fit, get_recipe

VARIANTS = ("eager", "compiled")
TAG = "@@"  # the workers' protocol lines on stdout start with it
CLASSES = 1000
QUIET = 0.25  # an epoch counts when other processes kept at most this many cores busy


class Stop(Exception):
    """The coordinator has the epochs it needs."""


class SyntheticClassification(ClassificationTask):
    """The classification task on a fixed random batch set: its loss is the task's own;
    before every epoch it reports the last one and waits for its turn on stdin."""

    def __init__(self, cfg: TrainConfig, steps: int) -> None:
        super().__init__(cfg)
        self.steps = steps
        self.window: tuple[str, float, float] | None = None

    def setup(self, dist: Any) -> Setup:
        model = build_model(self.cfg)
        model.reset_classifier(CLASSES)
        r, n = self.cfg.recipe, self.cfg.recipe.batch_size * self.steps
        g = torch.Generator().manual_seed(0)
        images = torch.randn(n, 3, r.resolution, r.resolution, generator=g)
        targets = torch.randint(0, CLASSES, (n,), generator=g)
        return Setup(
            model,
            TensorDataset(images, targets),
            validates=False,
            start_epoch=self.turn,
            save=lambda *_: None,  # the best weights are of no interest here
        )

    def metadata(self, epoch: int, val: dict[str, float] | None) -> dict[str, str]:
        return {}

    def turn(self, model: Any, epoch: int) -> None:
        """Report the last epoch, then wait for ``go`` (anything else stops the run)."""
        self.report()
        if sys.stdin.readline().strip() != "go":
            raise Stop
        self.window = load_snapshot()

    def report(self) -> None:
        """``ready`` with the last epoch's images/s and seconds (the engine's figures from
        ``metrics.csv``) and the cores other processes kept busy meanwhile."""
        last = None
        if self.window is not None:
            with open(Path(self.cfg.out) / "metrics.csv") as f:
                row = list(csv.DictReader(f))[-1]
            busy = others_since(self.window)
            last = {
                "images_per_s": round(float(row["images_per_s"]), 3),
                "epoch_s": round(float(row["epoch_seconds"]), 3),
                "others_cores": None if busy is None else round(busy, 3),
            }
        print(f"{TAG} ready " + json.dumps(last), flush=True)


def worker(args: argparse.Namespace) -> None:
    """One variant at one point: ``fit`` epoch by epoch, as long as the coordinator asks."""
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = get_recipe(
        args.recipe, batch_size=args.batch, resolution=args.resolution, epochs=args.max_epochs + 1
    )
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            args.model,
            "mnist",  # never read: the task's data are synthetic
            Path(tmp) / "run",
            recipe,
            workers=0,
            device=args.device,
            amp=args.amp,
            progress=False,
            compile=args.worker == "compiled",
        )
        with contextlib.suppress(Stop):  # the coordinator has the epochs it needs
            fit(SyntheticClassification(cfg, args.steps), cfg.run())
    print(f"{TAG} end {torch.get_num_threads()}", flush=True)


def start(variant: str, args: argparse.Namespace, model: str, res: int, log: Path):
    command = [sys.executable, __file__, "--worker", variant, "--model", model]
    command += ["--resolution", str(res), "--batch", str(args.batch), "--steps", str(args.steps)]
    command += ["--max-epochs", str(args.max_epochs)]
    command += ["--device", args.device, "--recipe", args.recipe]
    command += ["--amp"] if args.amp else []
    command += ["--threads", str(args.threads)] if args.threads else []
    return subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log.open("w"), text=True
    )


def answer(proc: subprocess.Popen, log: Path) -> tuple[str, str]:
    """The worker's next protocol line; its error's last line if it died."""
    for line in proc.stdout:
        if line.startswith(TAG):
            kind, _, text = line[len(TAG) :].strip().partition(" ")
            return kind, text
    proc.wait()
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return "failed", lines[-1] if lines else f"exit status {proc.returncode}"


def quiet_pairs(epochs: dict[str, list[dict]], warmup: int) -> list[int]:
    """The epochs after warm-up in which neither variant was disturbed by others."""
    done = min(len(e) for e in epochs.values())
    return [
        i
        for i in range(warmup, done)
        if all((epochs[v][i]["others_cores"] or 0) <= QUIET for v in VARIANTS)
    ]


def wait_quiet(limit_s: float) -> float:
    """Wait (at most ``limit_s``) until other processes leave the cores idle for a second;
    the seconds waited. The workers are idle meanwhile, so what is busy is the others."""
    began = time.perf_counter()
    while cores() - free_cores(1.0) > QUIET and time.perf_counter() - began < limit_s:
        time.sleep(2.0)
    return time.perf_counter() - began


def run_point(args: argparse.Namespace, model: str, res: int, tmp: Path) -> dict[str, Any]:
    """Eager and compiled side by side at one (model, resolution), an epoch each in turn,
    until ``--attempts`` epoch pairs are undisturbed or ``--max-epochs`` are run."""
    logs = {v: tmp / f"{model}-{res}-{v}.log" for v in VARIANTS}
    procs = {v: start(v, args, model, res, logs[v]) for v in VARIANTS}
    failed = {}
    for v in VARIANTS:  # "ready null": built, waiting for its first epoch
        kind, text = answer(procs[v], logs[v])
        if kind != "ready":
            failed[v] = text
    epochs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    waited = 0.0
    while not failed and len(epochs["eager"]) < args.max_epochs:
        waited += wait_quiet(args.max_wait) if args.device == "cpu" else 0.0
        for v in VARIANTS:
            procs[v].stdin.write("go\n")
            procs[v].stdin.flush()
            kind, text = answer(procs[v], logs[v])
            if kind != "ready":
                failed[v] = text
                break
            epochs[v].append(json.loads(text))
            e = epochs[v][-1]
            print(f"  {model} {res} {v}: {e['images_per_s']:.2f} img/s, others {e['others_cores']}")
        if len(quiet_pairs(epochs, args.warmup)) >= args.attempts:
            break
    threads = {}
    for v in VARIANTS:
        if procs[v].poll() is None:
            procs[v].stdin.write("stop\n")
            procs[v].stdin.close()
            kind, text = answer(procs[v], logs[v])
            threads[v] = int(text) if kind == "end" else None
        procs[v].wait()
    return {**summarise(args, model, res, epochs, failed, threads), "waited_s": round(waited)}


def summarise(
    args: argparse.Namespace,
    model: str,
    res: int,
    epochs: dict[str, list[dict]],
    failed: dict[str, str],
    threads: dict[str, int | None],
) -> dict[str, Any]:
    """The medians over the undisturbed epoch pairs (over all after warm-up when fewer
    than ``--attempts`` were), and the compiled variant's compile time."""
    counted = quiet_pairs(epochs, args.warmup)[: args.attempts] if not failed else []
    quiet = len(counted) >= args.attempts
    if not quiet:
        counted = list(range(args.warmup, min(len(e) for e in epochs.values())))
    point: dict[str, Any] = {"model": model, "resolution": res, "undisturbed": quiet}
    for v in VARIANTS:
        if v in failed:
            point[v] = {"failed": failed[v]}
            continue
        timed = [epochs[v][i] for i in counted]
        if not timed:  # the other variant failed before warm-up was over
            point[v] = {"epochs": epochs[v]}
            continue
        step_s = statistics.median(e["epoch_s"] for e in timed) / args.steps
        first = epochs[v][0]["epoch_s"]
        busy = [e["others_cores"] for e in timed if e["others_cores"] is not None]
        point[v] = {
            "images_per_s": round(statistics.median(e["images_per_s"] for e in timed), 3),
            "step_s": round(step_s, 4),
            "first_epoch_s": first,
            # The first epoch's time beyond its steps at the steady rate.
            "first_epoch_extra_s": round(first - args.steps * step_s, 2),
            "busy_other_cores": max(busy) if busy else None,
            "threads": threads.get(v),
            "epochs": [{**e, "counted": i in counted} for i, e in enumerate(epochs[v])],
        }
    if not failed:
        eager, compiled = point["eager"], point["compiled"]
        point["compile_s"] = compiled["first_epoch_extra_s"]
        point["compiled_over_eager"] = round(compiled["images_per_s"] / eager["images_per_s"], 3)
    return point


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


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "mobilenet_v3_large"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[224, 128])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch")
    parser.add_argument("--warmup", type=int, default=2, help="epochs not timed")
    parser.add_argument("--attempts", type=int, default=5, help="timed epochs per variant")
    parser.add_argument(
        "--max-epochs", type=int, default=12, help="epochs per variant at most (disturbed ones)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=60, help="seconds to wait for quiet before a pair"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA)")
    parser.add_argument("--recipe", default="demo", help="the recipe (mobilenet train's default)")
    parser.add_argument("--threads", type=int, default=0, help="0: PyTorch's default")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    began, load = time.perf_counter(), os.getloadavg()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for res in args.resolutions:
            for model in args.models:
                points.append(run_point(args, model, res, Path(tmp)))
    busy = [p[v].get("busy_other_cores") for p in points for v in VARIANTS]
    record = {
        "command": " ".join(["python benchmarks/train_compile.py", *sys.argv[1:]]),
        "machine": machine(),
        "cpu": cpu(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__,
        "source": source_state(),
        "date": datetime.date.today().isoformat(),
        "device": args.device,
        "amp": args.amp,
        "recipe": args.recipe,
        "batch": args.batch,
        "steps_per_epoch": args.steps,
        "warmup_epochs": args.warmup,
        "timed_epochs": args.attempts,
        "max_epochs": args.max_epochs,
        "max_wait_s": args.max_wait,
        "undisturbed_means_other_cores_at_most": QUIET,
        "load_average_at_start": [round(v, 2) for v in load],
        "busy_other_cores": max((b for b in busy if b is not None), default=None),
        "seconds": round(time.perf_counter() - began, 1),
        "points": points,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    for p in points:
        print(table_line(p))
    print(f"wrote {args.json} in {record['seconds']:.0f} s")


def table_line(p: dict[str, Any]) -> str:
    cells = [f"{p['model']} {p['resolution']}"]
    for v in VARIANTS:
        speed = p[v].get("images_per_s")
        if "failed" in p[v]:
            cells.append(f"{v} failed: {p[v]['failed']}")
        else:
            cells.append(f"{v} {speed:.2f} img/s" if speed else f"{v} -")
    if "compiled_over_eager" in p:
        cells.append(f"x{p['compiled_over_eager']:.3f}, compile {p['compile_s']:.0f} s")
    return "  ".join(cells)


if __name__ == "__main__":
    main()
