"""``mobilenet bench``: every inference engine timed in the same run, interleaved.

Each engine runs in a process of its own (so its peak memory is its own and allocator
state does not leak between engines); the processes take turns, one timing round each,
after a warm-up, so that the machine's load affects all of them alike. Reported: the
median latency per batch, images per second, the ratio to the best peer (the fastest
other engine of the run) and to eager PyTorch, each process's peak resident memory, the
CPU with its ISA features, and the cores other processes kept busy meanwhile.

Fair to every engine: PyTorch keeps freed memory (:mod:`mobilenet.train.cpu`: glibc
otherwise unmaps the activations after every call, 31.3 instead of 16.9 ms at batch 1);
``openvino`` is float32 (OpenVINO's default is bf16 where the CPU has it: ``openvino-bf16``);
ONNX Runtime's idle threads sleep instead of spinning when its threads fill the free cores.

Engines:
  eager              the model as built, eval mode, NCHW
  eager-fused        BatchNorm folded, channels_last, inference mode (prepare_for_inference)
  compile            torch.compile of eager-fused
  onnxruntime        the exported ONNX model in ONNX Runtime
  onnxruntime-int8   ONNX Runtime, static int8 quantization (QDQ, per-channel weights),
                     calibrated on random images: for speed, not accuracy
  torch-int8         PyTorch int8 (FX graph, x86 backend, per-channel), calibrated alike
  executorch         the ExecuTorch program (.pte, XNNPACK, batch 1 to 8) in ExecuTorch's
                     runtime, its thread pool set to --threads (it ignores OMP_NUM_THREADS)
  executorch-int8    ExecuTorch int8 (PT2E, XNNPACK quantizer), calibrated on random images
  torchvision-eager  torchvision's own implementation of the same network, when it has one
  openvino           a peer runtime: OpenVINO on the exported ONNX model, float32
  openvino-bf16      OpenVINO in bfloat16, on CPUs with bf16 instructions

The engines that run the ONNX export need the ``deploy`` extra (onnx, onnxruntime), the
ExecuTorch ones the ``mobile`` extra (executorch); without it they are not started, and
listed as failed with the ``pip install`` to run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import MobileNetError
from .extras import available, install_hint
from .machine import cores, free_cores, load_snapshot, others_since

__all__ = ["ENGINES", "BenchConfig", "build_engine", "cpu", "machine", "missing_extra", "run_bench"]

ENGINES = (
    "eager", "eager-fused", "compile", "onnxruntime", "onnxruntime-int8", "torch-int8",
    "executorch", "executorch-int8", "torchvision-eager", "openvino", "openvino-bf16",
)  # fmt: skip
TORCHVISION = {"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"}
TORCH_ENGINES = ("eager", "eager-fused", "compile", "torch-int8", "torchvision-eager")
OPENVINO_ENGINES = ("openvino", "openvino-bf16")
ONNX_ENGINES = ("onnxruntime", "onnxruntime-int8", *OPENVINO_ENGINES)  # run the ONNX export
EXECUTORCH_ENGINES = ("executorch", "executorch-int8")
ISA = {  # the features that decide which kernels an engine can use, by /proc/cpuinfo names
    "AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
    "BF16": ("avx512_bf16",), "AMX": ("amx_tile",),
}  # fmt: skip
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BUSY_WARNING = 0.25  # cores kept busy by other processes that make the timings suspect


@dataclass(frozen=True)
class BenchConfig:
    model: str
    width_mult: float = 1.0
    batch: int = 1
    resolution: int = 224
    threads: int = 1
    rounds: int = 7
    iterations: int = 10  # timed calls per round
    ort_spinning: bool | None = None  # None: spin only when threads leave a core free


# --------------------------------------------------------------------------- the machine


def _read(path: str) -> str:
    """A /proc file's text; empty where there is none (not Linux)."""
    return Path(path).read_text() if Path(path).is_file() else ""


def _field(cpuinfo: str, name: str) -> str:
    """The first processor's ``name`` field in a /proc/cpuinfo text (empty when absent)."""
    lines = cpuinfo.splitlines()
    return next((ln.partition(":")[2].strip() for ln in lines if ln.startswith(name)), "")


def has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (what ``openvino-bf16`` needs)."""
    return bool(set(_field(_read("/proc/cpuinfo"), "flags").split()) & set(BF16_FLAGS))


def cpu(cpuinfo: str | None = None) -> dict:
    """The CPU's model name, core count and ISA features, for recorded results: int8 and
    bf16 speed depend on VNNI, BF16 and AMX more than on anything else."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    flags = set(_field(text, "flags").split())
    isa = [name for name, names in ISA.items() if flags & set(names)]
    model = _field(text, "model name") or platform.machine()
    return {"model": model, "cores": os.cpu_count(), "isa": isa}


def machine() -> str:
    """The CPU model and core count, for recorded results."""
    return "{model}, {cores} cores".format(**cpu())


# --------------------------------------------------------------------------- engines


def check_engines(
    names: list[str], model: str, width: float, explicit: bool = False, batch: int = 1
) -> list[str]:
    """The engines of ``names`` that apply here; unknown ones refused. Those that do not
    apply (torchvision lacks the network, OpenVINO missing, no bf16, a batch above what an
    ExecuTorch program holds) are left out, or, for an ``explicit`` request, refused where
    running them would time something else: ``openvino-bf16`` on a CPU without bf16
    (OpenVINO would quietly compute in float32), ExecuTorch above its batch bound."""
    from .export.executorch import MAX_BATCH  # (torch, not executorch, is imported)

    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise MobileNetError(f"unknown engine {unknown[0]!r}; choose from: {', '.join(ENGINES)}")
    if "torchvision-eager" in names and (model not in TORCHVISION or width != 1.0):
        names = [n for n in names if n != "torchvision-eager"]
    if "openvino-bf16" in names and not has_bf16():
        if explicit:
            why = "this CPU has no avx512_bf16 or amx_bf16 (see /proc/cpuinfo)"
            raise MobileNetError(f"openvino-bf16 needs bf16 instructions: {why}; use openvino")
        names = [n for n in names if n != "openvino-bf16"]
    if not available("openvino"):
        names = [n for n in names if n not in OPENVINO_ENGINES]
    pte = [n for n in names if n in EXECUTORCH_ENGINES]
    if pte and batch > MAX_BATCH:
        if explicit:
            raise MobileNetError(f"{pte[0]} runs batches of 1 to {MAX_BATCH}, not {batch}")
        names = [n for n in names if n not in EXECUTORCH_ENGINES]
    return names


def missing_extra(engine: str) -> str | None:
    """Why ``engine`` cannot run in this install (an extra not installed), or None."""
    if engine in ONNX_ENGINES:
        for module in ("onnx", "onnxruntime"):
            if not available(module):
                return f"needs {module}: {install_hint('deploy')}"
    if engine in EXECUTORCH_ENGINES and not available("executorch"):
        return f"needs executorch: {install_hint('mobile')}"
    return None


# --------------------------------------------------------------------------- worker side


def build_engine(engine: str, cfg: BenchConfig, tmp: Path) -> Callable[[], object]:
    """A zero-argument callable that runs one batch with ``engine``."""
    import torch

    from .export import export_onnx, prepare_for_inference
    from .export.onnx import input_size
    from .models import create_model

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, *input_size(cfg.resolution))  # a side, or [height, width]
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
    if engine in EXECUTORCH_ENGINES:
        return _pte_engine(engine, model, cfg, x, tmp)
    path = tmp / "model.onnx"
    export_onnx(model, path, cfg.resolution)
    if engine in OPENVINO_ENGINES:
        import openvino

        config = openvino_config(engine, cfg.threads)
        request = openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()
        images = x.numpy()
        return lambda: request.infer({0: images})
    if engine == "onnxruntime-int8":
        from .export.quantize import quantize_file

        quantize_file(path, tmp / "model.int8.onnx", _random_batches(cfg.resolution))
        path = tmp / "model.int8.onnx"
    spin = cfg.threads < cores() if cfg.ort_spinning is None else cfg.ort_spinning
    session = ort_session(path, cfg.threads, spin)
    feed = {"images": x.numpy()}
    return lambda: session.run(None, feed)


def _pte_engine(engine: str, model, cfg: BenchConfig, x, tmp: Path) -> Callable[[], object]:
    """The model as an ExecuTorch program (int8: calibrated like the other int8 engines),
    on ``cfg.threads`` threads: the runtime starts a pool of one thread per core."""
    import torch

    from .export.executorch import export_pte, export_pte_int8, read_pte, set_pte_threads

    path = tmp / "model.pte"
    if engine == "executorch-int8":
        calibration = (torch.randn(1, 3, cfg.resolution, cfg.resolution) for _ in range(8))
        export_pte_int8(model, calibration, path, cfg.resolution)
    else:
        export_pte(model, path, cfg.resolution)
    set_pte_threads(cfg.threads)  # before the load (see set_pte_threads)
    run, _ = read_pte(path)
    return lambda: run(x)


def openvino_config(engine: str, threads: int) -> dict[str, object]:
    """OpenVINO's CPU plugin settings: the precision pinned, since the plugin's default
    is bf16 wherever the CPU has it, which would time bf16 under a float32 name."""
    precision = "bf16" if engine == "openvino-bf16" else "f32"
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    return {**config, "INFERENCE_PRECISION_HINT": precision}


def ort_session(path: Path, threads: int, spin: bool):
    """An ONNX Runtime CPU session on ``threads`` threads. ``spin=False`` makes idle pool
    threads sleep at once instead of spinning for more work: when the threads fill the
    free cores, spinning takes them from the other engines and from the machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
    kept = False
    if engine in TORCH_ENGINES:  # as training does: see mobilenet.train.cpu
        from .train.cpu import keep_freed_memory

        kept = keep_freed_memory()
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
            reply = {"times": times, "peak_rss_bytes": peak, "keep_freed_memory": kept}
            print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------- driver side


def run_bench(cfg: BenchConfig, engines: list[str], progress=None) -> dict:
    """Time ``engines`` in interleaved rounds; the JSON-ready result.

    Refuses, before any process starts, a configuration whose engines cannot all fit in
    memory at once (:func:`mobilenet.limits.check_memory`): each holds the model and a
    batch's activations, and all of them stay alive for the interleaved rounds.
    """
    from .limits import check_memory, meta_model

    engines = check_engines(engines, cfg.model, cfg.width_mult, batch=cfg.batch)
    starting = [e for e in engines if missing_extra(e) is None]
    model = meta_model(cfg.model, width_mult=cfg.width_mult)
    check_memory(model, cfg.resolution, cfg.batch, "the benchmark", copies=max(1, len(starting)))
    start = load_snapshot()
    if cfg.ort_spinning is None:
        cfg = dataclasses.replace(cfg, ort_spinning=cfg.threads < free_cores())
    failed: dict[str, str] = {}
    procs = _start_engines(cfg, engines, failed, progress)
    try:
        replies = _rounds(cfg, procs, progress)
    finally:
        for proc in procs.values():
            if proc.stdin:
                proc.stdin.close()
            proc.wait()
    others = others_since(start)  # after the waits: the children's time is counted as ours
    if not replies:
        reasons = "; ".join(f"{e}: {r}" for e, r in failed.items()) or "none started"
        raise MobileNetError(f"no engine ran ({reasons})")
    medians = {e: statistics.median(r["times"]) for e, r in replies.items()}
    rows = engine_rows(cfg.batch, medians)
    for row in rows:
        reply = replies[row["engine"]]
        row.update({k: reply[k] for k in ("peak_rss_bytes", "keep_freed_memory")})
    setting = ("model", "width_mult", "batch", "resolution", "threads")
    return {
        **{key: getattr(cfg, key) for key in setting},
        "cpu": cpu(),
        "busy_other_cores": None if others is None else round(others, 2),
        "onnxruntime_spinning": cfg.ort_spinning,
        "engines": rows,
        "failed": failed,
    }


def engine_rows(batch: int, medians: dict[str, float]) -> list[dict]:
    """One row per engine from its median seconds per batch. The headline ratio is to the
    best peer, the fastest other engine of the run (below 1: the fastest, by that much):
    beating a slow baseline such as eager (``ratio_to_eager``) does not make one fast."""
    rows, eager = [], medians.get("eager")
    for engine, median in medians.items():
        peers = {e: m for e, m in medians.items() if e != engine}
        best = min(peers, key=peers.__getitem__) if peers else None
        rows.append(
            {
                "engine": engine,
                "median_ms": round(median * 1000, 3),
                "images_per_s": round(batch / median, 2),
                "ratio_to_best": round(median / peers[best], 3) if best else None,
                "best_peer": best,
                "ratio_to_eager": round(median / eager, 3) if eager else None,
            }
        )
    return rows


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
            cmd = [sys.executable, "-m", "mobilenet.bench", engine, json.dumps(cfg.__dict__)]
            pipe = subprocess.PIPE
            proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe, stderr=pipe, text=True, env=env)
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


def _rounds(cfg: BenchConfig, procs: dict[str, subprocess.Popen], progress) -> dict[str, dict]:
    """Interleaved rounds: each engine in turn runs ``cfg.iterations`` timed calls. Per
    engine: all its times, and its last reply's peak memory and allocator setting."""
    replies: dict[str, dict] = {e: {"times": []} for e in procs}
    for round_ in range(cfg.rounds):
        for engine, proc in procs.items():
            proc.stdin.write(f"{cfg.iterations}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            reply = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            replies[engine] = {**reply, "times": replies[engine]["times"] + reply["times"]}
        if progress:
            progress(f"round {round_ + 1}/{cfg.rounds}")
    return replies


def format_table(result: dict) -> str:
    """The result as a table headed by the run's conditions: the CPU, its ISA features
    and the other processes' load, without which the milliseconds mean little."""
    info, busy = result["cpu"], result["busy_other_cores"]
    res = result["resolution"]  # a side, or [height, width]
    size = f"{res}x{res}" if isinstance(res, int) else "x".join(map(str, res))
    load = "not measured" if busy is None else f"{busy:.2f} cores busy with other processes"
    lines = [
        f"{result['model']} (width {result['width_mult']:g}), batch {result['batch']}, "
        f"{size}, {result['threads']} thread(s)",
        f"{info['model']}, {info['cores']} cores ({', '.join(info['isa']) or 'no AVX2'}); {load}",
        f"{'engine':<18} {'median ms':>10} {'images/s':>10} {'vs best peer':>30} {'peak RSS':>10}",
    ]
    for row in result["engines"]:
        peer = row["best_peer"]
        ratio = f"{row['ratio_to_best']:.2f}x {peer}" if peer else ""
        lines.append(
            f"{row['engine']:<18} {row['median_ms']:>10.2f} {row['images_per_s']:>10.1f} "
            f"{ratio:>30} {row['peak_rss_bytes'] / 2**20:>7.0f} MiB"
        )
    for engine, reason in result["failed"].items():
        lines.append(f"{engine:<18} failed: {reason}")
    if busy is not None and busy > BUSY_WARNING:
        warning = f"warning: other processes kept {busy:.2f} cores busy during the run"
        lines.append(warning + "; the timings are slower and noisier than on a quiet machine")
    return "\n".join(lines)


if __name__ == "__main__":  # worker: python -m mobilenet.bench ENGINE CONFIG_JSON
    _worker(sys.argv[1], BenchConfig(**json.loads(sys.argv[2])))
