"""Training throughput: mobilenet_v2 at 224, batch 32, ours vs torchvision's eager loop.

Every variant trains the same network (forward, cross-entropy, backward, SGD step) on
a fixed random batch, in a process of its own (allocator settings are process-wide).
The processes take turns: in each round every variant runs ``--steps`` steps while the
others wait idle, so the machine's load affects them alike; the median step time over
the rounds is reported. The ratios, not the absolute times, are the result.

Variants:
  torchvision eager            torchvision.models.mobilenet_v2, NCHW, a plain loop
  torchvision eager + alloc    the same, with the allocator setting of `mobilenet train`
  mobilenet eager              our mobilenet_v2, NCHW, a plain loop
  mobilenet train (CPU)        what `mobilenet train` does on a CPU: channels_last and
                               freed memory kept for reuse (mobilenet.train.cpu)

    python benchmarks/train_throughput.py [--threads 2] [--rounds 5] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from mobilenet.machine import machine

VARIANTS = {
    # name: (library, channels_last, keep freed memory)
    "torchvision eager": ("torchvision", False, False),
    "torchvision eager + alloc": ("torchvision", False, True),
    "mobilenet eager": ("mobilenet", False, False),
    "mobilenet train (CPU)": ("mobilenet", True, True),
}


def worker(name: str, threads: int, batch: int, res: int) -> None:
    """Build one variant, then time ``run N`` requests read from stdin."""
    library, channels_last, keep_memory = VARIANTS[name]
    if keep_memory:
        from mobilenet.train.cpu import keep_freed_memory

        assert keep_freed_memory()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    if library == "torchvision":
        import torchvision

        model = torchvision.models.mobilenet_v2()
    else:
        import mobilenet

        model = mobilenet.create_model("mobilenet_v2")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), generator=g)

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    step()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        steps = int(line.split()[1])
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per round and variant")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("train_throughput.json")
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.batch, args.resolution)
        return

    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # idle workers must not spin
    procs = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--worker", name, "--threads", str(args.threads)]
        command += ["--batch", str(args.batch), "--resolution", str(args.resolution)]
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert proc.stdout.readline().strip() == "ready", f"{name} failed to start"
        procs[name] = proc
        print(f"started {name}", flush=True)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, proc in procs.items():
            proc.stdin.write(f"run {args.steps}\n")
            proc.stdin.flush()
            times[name] += json.loads(proc.stdout.readline())
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    base = statistics.median(times["torchvision eager"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "variant": name,
                "median_step_s": round(median, 4),
                "images_per_s": round(args.batch / median, 2),
                "speedup_vs_torchvision_eager": round(base / median, 3),
            }
        )
    print(
        f"\nmobilenet_v2 training step, batch {args.batch}, {args.resolution}x{args.resolution}, "
        f"{args.threads} threads, {args.rounds * args.steps} steps each, {machine()}"
    )
    print(f"{'variant':<28} {'step (s)':>9} {'img/s':>8} {'vs torchvision eager':>21}")
    for row in rows:
        print(
            f"{row['variant']:<28} {row['median_step_s']:>9.3f} {row['images_per_s']:>8.1f} "
            f"{row['speedup_vs_torchvision_eager']:>20.2f}x"
        )
    result = {
        "machine": machine(),
        "threads": args.threads,
        "batch": args.batch,
        "resolution": args.resolution,
        "steps_per_variant": args.rounds * args.steps,
        "command": "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:]),
        "results": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
