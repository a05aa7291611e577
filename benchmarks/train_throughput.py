"""Training throughput: mobilenet_v2 at 224, batch 32, ours vs torchvision's eager loop.

Every variant trains the same network (forward, cross-entropy, backward, SGD step) on
the same random batch; variants are timed in interleaved rounds after warm-up, so that
the machine's load affects them alike, and the median step time is reported. The
ratios, not the absolute times, are the result.

    python benchmarks/train_throughput.py [--threads 2] [--rounds 5] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

import mobilenet


def make_step(model: torch.nn.Module, channels_last: bool, batch: int, res: int) -> Callable:
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

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per round and variant")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--json", type=Path, default=Path(__file__).with_name("train_throughput.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b, r = args.batch, args.resolution

    variants: dict[str, Callable] = {
        "torchvision eager": make_step(torchvision.models.mobilenet_v2(), False, b, r),
        "mobilenet eager": make_step(mobilenet.create_model("mobilenet_v2"), False, b, r),
        "mobilenet channels_last": make_step(mobilenet.create_model("mobilenet_v2"), True, b, r),
    }
    if args.compile:
        compiled = torch.compile(mobilenet.create_model("mobilenet_v2"))
        variants["mobilenet channels_last + compile"] = make_step(compiled, True, b, r)
    for name, step in variants.items():  # warm-up (and compilation)
        start = time.perf_counter()
        step()
        step()
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    base = statistics.median(times["torchvision eager"])
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "variant": name,
                "median_step_s": median,
                "images_per_s": b / median,
                "speedup_vs_torchvision_eager": base / median,
            }
        )
    print(f"\nmobilenet_v2 training, batch {b}, {r}x{r}, {args.threads} threads")
    print(f"{'variant':<36} {'step (s)':>9} {'img/s':>8} {'vs torchvision':>15}")
    for row in rows:
        print(
            f"{row['variant']:<36} {row['median_step_s']:>9.3f} {row['images_per_s']:>8.1f} "
            f"{row['speedup_vs_torchvision_eager']:>14.2f}x"
        )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "batch": b,
        "resolution": r,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "results": rows,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
