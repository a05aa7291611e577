"""``mobilenet bench``: every inference engine timed in the same run, interleaved.

Each engine runs in a process of its own (so its peak memory is its own and allocator
state does not leak between engines); the processes take turns, one timing round each,
after a warm-up, so that the machine's load affects all of them alike. Reported: the
median latency per batch, images per second, the ratio to plain eager PyTorch, and the
peak resident memory of the engine's process.

Engines:
  eager              the model as built, eval mode, NCHW
  eager-fused        BatchNorm folded, channels_last, inference mode (prepare_for_inference)
  compile            torch.compile of eager-fused
  onnxruntime        the exported ONNX model in ONNX Runtime
  onnxruntime-int8   ONNX Runtime, static int8 quantization (QDQ, per-channel weights),
                     calibrated on random images: for speed, not accuracy
  torch-int8         PyTorch int8 (FX graph mode, x86 backend, per-channel weights),
                     calibrated on random images
  torchvision-eager  torchvision's own implementation of the same network, when it has one
  openvino           a peer runtime: OpenVINO on the exported ONNX model, when installed

The engines that run the ONNX export need the ``deploy`` extra (onnx, onnxruntime);
without it they are not started, and listed as failed with the ``pip install`` to run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import MobileNetError
from .extras import available, install_hint

__all__ = ["ENGINES", "BenchConfig", "build_engine", "machine", "missing_extra", "run_bench"]

ENGINES = (
    "eager",
    "eager-fused",
    "compile",
    "onnxruntime",
    "onnxruntime-int8",
    "torch-int8",
    "torchvision-eager",
    "openvino",
)
TORCHVISION = {"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"}
ONNX_ENGINES = ("onnxruntime", "onnxruntime-int8", "openvino")  # run the checked ONNX export


@dataclass(frozen=True)
class BenchConfig:
    model: str
    width_mult: float = 1.0
    batch: int = 1
    resolution: int = 224
    threads: int = 1
    rounds: int = 7
    iterations: int = 10  # timed calls per round


def machine() -> str:
    """The CPU model and core count, for recorded results."""
    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def check_engines(names: list[str], model: str, width_mult: float) -> list[str]:
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise MobileNetError(f"unknown engine {unknown[0]!r}; choose from: {', '.join(ENGINES)}")
    if "torchvision-eager" in names and (model not in TORCHVISION or width_mult != 1.0):
        names = [n for n in names if n != "torchvision-eager"]
    if "openvino" in names and not available("openvino"):
        names = [n for n in names if n != "openvino"]
    return names


def missing_extra(engine: str) -> str | None:
    """Why ``engine`` cannot run in this install (an extra not installed), or None."""
    if engine in ONNX_ENGINES:
        for module in ("onnx", "onnxruntime"):
            if not available(module):
                return f"needs {module}: {install_hint('deploy')}"
    return None


# --------------------------------------------------------------------------- worker side


def build_engine(engine: str, cfg: BenchConfig, tmp: Path):
    """A zero-argument callable that runs one batch with ``engine``."""
    import torch

    from .export import export_onnx, onnx_session, prepare_for_inference
    from .models import create_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, cfg.resolution, cfg.resolution)
    if engine == "torchvision-eager":
        import torchvision

        model = getattr(torchvision.models, cfg.model)().eval()
        return lambda: _no_grad(model, x)
    model = create_model(cfg.model, width_mult=cfg.width_mult).eval()
    if engine == "eager":
        return lambda: _no_grad(model, x)
    if engine == "torch-int8":
        from .export.int8 import quantize_model

        calibration = (torch.randn(1, 3, cfg.resolution, cfg.resolution) for _ in range(8))
        int8 = quantize_model(model, calibration, cfg.resolution)
        return lambda: _no_grad(int8, x)
    if engine in ("eager-fused", "compile"):
        fused = prepare_for_inference(model)
        if engine == "compile":
            fused = torch.compile(fused)
        xl = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                return fused(xl)

        return run
    path = tmp / "model.onnx"
    export_onnx(model, path, cfg.resolution)
    if engine == "openvino":
        import openvino

        compiled = openvino.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": cfg.threads, "PERFORMANCE_HINT": "LATENCY"}
        )
        request = compiled.create_infer_request()
        images = x.numpy()
        return lambda: request.infer({0: images})
    if engine == "onnxruntime-int8":
        from .export.quantize import quantize_file

        quantize_file(path, tmp / "model.int8.onnx", _random_batches(cfg.resolution))
        path = tmp / "model.int8.onnx"
    session = onnx_session(path, cfg.threads)
    feed = {"images": x.numpy()}
    return lambda: session.run(None, feed)


def _random_batches(resolution: int) -> Iterator[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(8):
        yield {"images": rng.standard_normal((1, 3, resolution, resolution), dtype=np.float32)}


def _no_grad(model, x):
    import torch

    with torch.inference_mode():
        return model(x)


def _worker(engine: str, cfg: BenchConfig) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = build_engine(engine, cfg, Path(tmp))
        for _ in range(3):
            run()  # warm-up (and compilation)
        print("ready", flush=True)
        for line in sys.stdin:
            n = int(line)
            times = []
            for _ in range(n):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps({"times": times, "peak_rss_bytes": peak}), flush=True)


# --------------------------------------------------------------------------- driver side


def run_bench(cfg: BenchConfig, engines: list[str], progress=None) -> dict:
    """Time ``engines`` in interleaved rounds; the JSON-ready result.

    Refuses, before any process starts, a configuration whose engines cannot all fit in
    memory at once (:func:`mobilenet.limits.check_memory`): each holds the model and a
    batch's activations, and all of them stay alive for the interleaved rounds.
    """
    from .limits import check_memory, meta_model

    engines = check_engines(engines, cfg.model, cfg.width_mult)
    starting = [e for e in engines if missing_extra(e) is None]
    check_memory(
        meta_model(cfg.model, width_mult=cfg.width_mult),
        cfg.resolution,
        cfg.batch,
        "the benchmark",
        copies=max(1, len(starting)),
    )
    failed: dict[str, str] = {}
    procs = _start_engines(cfg, engines, failed, progress)
    try:
        times, peaks = _rounds(cfg, procs, progress)
    finally:
        for proc in procs.values():
            if proc.stdin:
                proc.stdin.close()
            proc.wait()
    if "eager" not in times:
        raise MobileNetError(f"the eager engine failed: {failed.get('eager', 'not run')}")
    eager = statistics.median(times["eager"])
    rows = []
    for engine, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "engine": engine,
                "median_ms": round(median * 1000, 3),
                "images_per_s": round(cfg.batch / median, 2),
                "ratio_to_eager": round(median / eager, 3),
                "peak_rss_bytes": peaks[engine],
            }
        )
    return {
        "model": cfg.model,
        "width_mult": cfg.width_mult,
        "batch": cfg.batch,
        "resolution": cfg.resolution,
        "threads": cfg.threads,
        "engines": rows,
        "failed": failed,
    }


def _start_engines(
    cfg: BenchConfig, engines: list[str], failed: dict[str, str], progress
) -> dict[str, subprocess.Popen]:
    """One process per engine, each ready to time; those that fail to start go to
    ``failed`` with their last line of error."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(cfg.threads)}
    procs: dict[str, subprocess.Popen] = {}
    try:
        for engine in engines:
            reason = missing_extra(engine)
            if reason:  # not started: reported in one line with the others that failed
                failed[engine] = reason
                continue
            if progress:
                progress(f"preparing {engine}")
            command = [sys.executable, "-m", "mobilenet.bench", engine, json.dumps(cfg.__dict__)]
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                err = proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
                failed[engine] = err[-1] if err else "failed to start"
                proc.wait()
                continue
            procs[engine] = proc
    except BaseException:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        raise
    return procs


def _rounds(
    cfg: BenchConfig, procs: dict[str, subprocess.Popen], progress
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved rounds: each engine in turn runs ``cfg.iterations`` timed calls."""
    times: dict[str, list[float]] = {e: [] for e in procs}
    peaks: dict[str, int] = {}
    for round_ in range(cfg.rounds):
        for engine, proc in procs.items():
            proc.stdin.write(f"{cfg.iterations}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            reply = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            times[engine] += reply["times"]
            peaks[engine] = reply["peak_rss_bytes"]
        if progress:
            progress(f"round {round_ + 1}/{cfg.rounds}")
    return times, peaks


def format_table(result: dict) -> str:
    lines = [
        f"{result['model']} (width {result['width_mult']:g}), batch {result['batch']}, "
        f"{result['resolution']}x{result['resolution']}, {result['threads']} thread(s)",
        f"{'engine':<18} {'median ms':>10} {'images/s':>10} {'vs eager':>9} {'peak RSS':>10}",
    ]
    for row in result["engines"]:
        lines.append(
            f"{row['engine']:<18} {row['median_ms']:>10.2f} {row['images_per_s']:>10.1f} "
            f"{row['ratio_to_eager']:>8.2f}x {row['peak_rss_bytes'] / 2**20:>7.0f} MiB"
        )
    for engine, reason in result["failed"].items():
        lines.append(f"{engine:<18} failed: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: python -m mobilenet.bench ENGINE CONFIG_JSON
    _worker(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))
