"""Start-up time to the first training batch of an image folder: 10k, 100k and 1M files.

Measured from the moment the dataset is built to the first batch out of a DataLoader
(2 workers, batch 256, a DistributedSampler, the training transform at 64 px): what a
training run waits before its first step, without the model. Each measurement is a
fresh process; a 2-process measurement starts two together, each as one rank of a
2-process torchrun (its own dataset, its own shard), and reports the slower.

  now, cold      the dataset as built today with no header cache (a first run)
  now, warm      the same again: the second process or run reads the cached verdicts
  before         the up-front full decode of every file this replaced (commit 2608bfb:
                 sorted rglob listing, then find_broken on 4 threads), 10k and 100k only

The folders are real files, not links: tiny 8x8 JPEGs (16 distinct ones, ~650 bytes)
in ImageNet-like class folders of 1,000 files, written to a temporary folder outside the
repository and removed afterwards. They are in the page cache when measured (just
written): a cold disk adds its own read time to every row alike. Busy fractions of all
cores are read from /proc/stat over each measurement; before the runs the machine is
sampled idle for 2 s (other work on a shared machine shows there).

    python benchmarks/data_startup.py [--sizes 10000 100000 1000000] [--before-up-to 100000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores together, from the first line of /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(start: tuple[int, int]) -> float:
    busy, total = cpu_times()
    return round((busy - start[0]) / max(1, total - start[1]), 3)


def generate(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(16):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, "JPEG")
        blobs.append(buffer.getvalue())
    per_class = 1000 if n >= 10_000 else max(1, n // 10)
    for c in range(0, n, per_class):
        folder = root / f"n{c // per_class:05d}"
        folder.mkdir(parents=True)
        for i in range(c, min(n, c + per_class)):
            (folder / f"{i:08d}.JPEG").write_bytes(blobs[i % 16])


# --------------------------------------------------------------------------- one process


def legacy_dataset(root: Path, transform):
    """The folder as ImageFolder read it before: sorted rglob, then a full decode of all."""
    from torch.utils.data import Dataset

    from mobilenet.data import find_broken, load_rgb
    from mobilenet.data.images import is_image_file

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    samples = [
        (path, k)
        for k, d in enumerate(classes)
        for path in sorted((root / d).rglob("*"))
        if path.is_file() and is_image_file(path)
    ]
    broken = find_broken([p for p, _ in samples])
    samples = [(p, k) for p, k in samples if p not in broken]

    class Legacy(Dataset):
        def __len__(self) -> int:
            return len(samples)

        def __getitem__(self, i: int):
            return transform(load_rgb(samples[i][0])), samples[i][1]

    return Legacy()


def child(root: Path, mode: str, rank: int, world: int) -> None:
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from mobilenet.data import Augment, folder_splits, train_transform
    from mobilenet.models.base import EvalConfig
    from mobilenet.train.cpu import one_thread_worker

    transform = train_transform(64, Augment(), EvalConfig())
    start = time.perf_counter()
    if mode == "before":
        dataset = legacy_dataset(root, transform)
    else:
        dataset = folder_splits(root, None, 0.0, transform, transform).train
    built = time.perf_counter()
    sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(
        dataset,
        batch_size=256,
        sampler=sampler,
        num_workers=2,
        worker_init_fn=one_thread_worker,
        generator=torch.Generator(),
    )
    images, _ = next(iter(loader))
    done = time.perf_counter()
    assert images.shape == (256, 3, 64, 64)
    result = {"dataset_s": built - start, "first_batch_s": done - built, "total_s": done - start}
    print(json.dumps({**result, "samples": len(dataset)}), flush=True)


# --------------------------------------------------------------------------- the driver


def measure(root: Path, mode: str, processes: int, home: Path) -> dict:
    """``processes`` children started together; the slowest one's times."""
    env = {**os.environ, "MOBILENET_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", str(root), "--mode", mode]
    start = cpu_times()
    procs = [
        subprocess.Popen(
            [*command, "--rank", str(r), "--world", str(processes)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(processes)
    ]
    outputs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"a measuring process failed:\n{err}")
    runs = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    slowest = max(runs, key=lambda r: r["total_s"])
    return {
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in slowest.items()},
        "each_total_s": [round(r["total_s"], 2) for r in runs],
        "cores_busy": busy_since(start),
    }


def run(sizes: list[int], before_up_to: int, workdir: str | None) -> dict:
    from mobilenet.machine import machine

    idle = cpu_times()
    time.sleep(2)
    background = busy_since(idle)
    results = []
    with tempfile.TemporaryDirectory(prefix="data-startup-", dir=workdir) as tmp:
        for n in sizes:
            root = Path(tmp) / f"folder-{n}"
            t = time.perf_counter()
            generate(root, n)
            print(f"generated {n:,} files in {time.perf_counter() - t:.0f} s", flush=True)
            cases = [("now, cold", "now", 1, "cold1"), ("now, warm", "now", 1, "cold1")]
            cases += [("now, cold", "now", 2, "cold2"), ("now, warm", "now", 2, "cold2")]
            if n <= before_up_to:
                cases += [("before", "before", 1, "old"), ("before", "before", 2, "old")]
            for label, mode, processes, home in cases:
                row = measure(root, mode, processes, Path(tmp) / f"home-{n}-{home}")
                results.append({"files": n, "case": label, "processes": processes, **row})
                print(_line(results[-1]), flush=True)
            shutil.rmtree(root)
    return {
        "benchmark": "start-up to the first training batch of an image folder",
        "command": " ".join(["python benchmarks/data_startup.py", *sys.argv[1:]]),
        "machine": machine(),
        "cores_busy_before_runs": background,
        "python": sys.version.split()[0],
        "data": "real files: 8x8 JPEGs (~650 bytes), 1,000 per class folder, page-cached",
        "loader": "DataLoader, 2 workers, batch 256, DistributedSampler, 64 px train transform",
        "results": results,
    }


def _line(r: dict) -> str:
    return (
        f"{r['files']:>9,}  {r['case']:<10} {r['processes']:>2} proc  "
        f"dataset {r['dataset_s']:>7.2f} s  first batch {r['first_batch_s']:>5.2f} s  "
        f"total {r['total_s']:>7.2f} s  cores busy {r['cores_busy']:.0%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--before-up-to", type=int, default=100_000)
    parser.add_argument("--workdir", help="where the folders are generated (default: /tmp)")
    parser.add_argument("--out", type=Path, default=HERE / "data_startup.json")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="now", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.mode, args.rank, args.world)
        return
    report = run(args.sizes, args.before_up_to, args.workdir)
    print("\n".join(_line(r) for r in report["results"]))
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
