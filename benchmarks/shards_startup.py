"""Start-up of training on tar shards: the time until the first training batch.

A cluster job pays its data set's start-up on every process of every restart, so it
must not grow with the data set: a shard reader reads ``classes.json`` (the classes and
each shard's sample count) and opens only the shards of its first batch, instead of
listing and checking every file. This measures it for 10k and 100k tiny JPEGs (generated
once into a temporary folder, written as shards of 1,000 with ``write_shards``), for one
training process and for two (the ``RANK``/``WORLD_SIZE`` torchrun sets; no process
group, only the data is timed), each with its DataLoader workers.

Per run, in fresh processes: ``data`` is the time from naming the shards to holding the
first batch (``list_shards``, also timed on its own as ``list``; ``ShardStream``; the
DataLoader starting its workers; the first batch decoded and transformed at 224x224);
``process`` is from starting the process to that batch (interpreter, imports of torch
and mobilenet included). With two processes the slower one counts: the first step waits
for both. The median over ``--rounds`` rounds is reported, with how busy the machine's
cores were (``/proc/stat``) during the runs and in the second before them (other load on
a shared machine).

    python benchmarks/shards_startup.py [--sizes 10000 100000] [--rounds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the child


def child(data: str, batch: int, workers: int) -> None:
    """One training process's data start-up; prints its timings as JSON."""
    start = time.perf_counter()
    from torch.utils.data import DataLoader

    from mobilenet.data import Augment, train_transform
    from mobilenet.data.shards import ShardStream, list_shards
    from mobilenet.models.base import EvalConfig

    imported = time.perf_counter()
    shards = list_shards(data)  # classes.json: no shard is opened
    listed = time.perf_counter()
    dataset = ShardStream(shards, train_transform(224, Augment(), EvalConfig()), batch_size=batch)
    rank, world = dataset.place()
    dataset.set_epoch(0)
    loader = DataLoader(dataset, batch // world, num_workers=workers, drop_last=True)
    images, _ = next(iter(loader))
    done = time.perf_counter()
    result = {
        "rank": rank,
        "imports_s": imported - start,
        "data_s": done - imported,
        "list_s": listed - imported,
        "samples": len(dataset),
        "steps": len(loader),
        "batch": list(images.shape),
    }
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_since(before: tuple[int, int]) -> float:
    busy, total = cpu_times()
    return 100 * (busy - before[0]) / max(1, total - before[1])


def make_folder(root: Path, images: int, classes: int = 10) -> None:
    """``images`` 32x32 JPEGs (a gradient and noise, about 1 KB each) in ``classes``
    class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 32, dtype=np.float32)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        noise = rng.integers(0, 40, (32, 32, 3)).astype(np.float32)
        pixels = (ramp[None, :, None] * ((i % 7) / 7 + 0.2) + noise).clip(0, 255)
        path = root / f"class{i % classes:02d}" / f"{i:07d}.jpg"
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=85)


def run(data: str, processes: int, batch: int, workers: int) -> dict[str, float]:
    """Start ``processes`` children at once (ranks of one job); their timings."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(processes)}
    command = [sys.executable, __file__, "--child", data, "--batch", str(batch)]
    command += ["--workers", str(workers)]
    before = cpu_times()
    start = time.perf_counter()
    children = [
        subprocess.Popen(command, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(processes)
    ]
    results = []
    for proc in children:
        line = proc.stdout.readline()  # printed at the first batch
        results.append({**json.loads(line), "process_s": time.perf_counter() - start})
        proc.wait()
    busy = busy_since(before)
    assert len({r["samples"] for r in results}) == 1  # every rank the same count
    return {
        "data_s": max(r["data_s"] for r in results),
        "process_s": max(r["process_s"] for r in results),
        "imports_s": max(r["imports_s"] for r in results),
        "list_s": max(r["list_s"] for r in results),
        "samples_per_process": results[0]["samples"],
        "steps": results[0]["steps"],
        "busy_percent": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers a process")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=HERE / "shards_startup.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch, args.workers)
        return

    import warnings

    from mobilenet.data.shard_writer import write_shards
    from mobilenet.machine import machine

    before = cpu_times()
    time.sleep(1)
    background = busy_since(before)
    rows, prepared = [], {}
    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        for size in args.sizes:
            folder, dst = Path(tmp) / f"images-{size}", Path(tmp) / f"shards-{size}"
            start = time.perf_counter()
            make_folder(folder, size)
            made = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no image may be skipped
                written = write_shards(folder, dst, shard_size=args.shard_size)
            prepared[size] = {
                "generate_s": made - start,
                "write_shards_s": time.perf_counter() - made,
                "shards": len(written.shards),
                "bytes": sum(p.stat().st_size for p in written.shards),
            }
            print(f"{size} images: generated in {made - start:.1f} s, "
                  f"{len(written.shards)} shards written in "
                  f"{prepared[size]['write_shards_s']:.1f} s", flush=True)  # fmt: skip
            for processes in args.processes:
                runs = [
                    run(written.pattern, processes, args.batch, args.workers)
                    for _ in range(args.rounds)
                ]
                row = {"images": size, "processes": processes, "workers": args.workers}
                for key in ("data_s", "list_s", "process_s", "imports_s", "busy_percent"):
                    row[key] = statistics.median(r[key] for r in runs)
                row["data_s_all"] = [round(r["data_s"], 4) for r in runs]
                row["samples_per_process"] = runs[0]["samples_per_process"]
                row["steps_per_epoch"] = runs[0]["steps"]
                rows.append(row)

    header = (
        f"{'images':>8} {'procs':>5} {'workers':>7} {'data -> batch':>14} "
        f"{'of it listing':>13} {'start -> batch':>15} {'imports':>8} {'cores busy':>10}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['images']:>8} {r['processes']:>5} {r['workers']:>7} {r['data_s']:>12.3f} s "
            f"{r['list_s'] * 1000:>10.1f} ms {r['process_s']:>13.3f} s "
            f"{r['imports_s']:>6.2f} s {r['busy_percent']:>9.0f}%"
        )
    print(f"cores busy in the second before the runs: {background:.0f}%")
    record = {
        "machine": machine(),
        "python": sys.version.split()[0],
        "command": "python benchmarks/shards_startup.py " + " ".join(sys.argv[1:]),
        "settings": {
            "batch_global": args.batch,
            "resolution": 224,
            "shard_size": args.shard_size,
            "rounds": args.rounds,
            "page_cache": "warm (the shards were just written)",
        },
        "cores_busy_percent_before": background,
        "prepared": prepared,
        "results": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
