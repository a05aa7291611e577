"""``mobilenet bench``: every inference engine timed in the same run, interleaved.

Each engine runs in a process of its own (so its peak memory is its own and allocator
state does not leak between engines); the processes take turns, one timing round each,
after a warm-up, so that the machine's load affects all of them alike. Reported: the
median latency per batch, images per second, the ratio to the best peer (the fastest
other engine of the run) and to eager PyTorch, each process's peak resident memory, the
CPU with its ISA features, and the cores other processes kept busy meanwhile.

Every engine times the same random weights, whose BatchNorm statistics are measured on
random images (:func:`~mobilenet.bench_engines.timing_model`): activations are then
unit-scale as in a trained network, and the int8 engines' files, whose graphs depend on the
calibrated ranges, are shaped like those of trained weights.

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
  litert             the LiteRT model (.tflite) in the LiteRT interpreter (XNNPACK delegate),
                     on --threads threads
  litert-int8        LiteRT full-integer int8 (PT2E, litert-torch's quantizer), calibrated alike
  torchvision-eager  torchvision's own implementation of the same network, when it has one
  openvino           a peer runtime: OpenVINO on the exported ONNX model, float32
  openvino-bf16      OpenVINO in bfloat16, on CPUs with bf16 instructions

The engines that run the ONNX export need the ``deploy`` extra (onnx, onnxruntime), the
ExecuTorch ones the ``mobile`` extra (executorch), the LiteRT ones the ``litert`` extra
(litert-torch, ai-edge-litert); without it they are not started, and
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
from pathlib import Path

from .bench_engines import (
    ENGINES,
    EXECUTORCH_ENGINES,
    LITERT_ENGINES,
    ONNX_ENGINES,
    OPENVINO_ENGINES,
    TORCH_ENGINES,
    TORCHVISION,
    BenchConfig,
    build_engine,
    openvino_config,
    ort_session,
)
from .errors import MobileNetError
from .extras import available, install_hint
from .machine import free_cores, load_snapshot, others_since

__all__ = [
    "ENGINES",
    "BenchConfig",
    "build_engine",
    "cpu",
    "machine",
    "missing_extra",
    "openvino_config",
    "ort_session",
    "run_bench",
]

ISA = {  # the features that decide which kernels an engine can use, by /proc/cpuinfo names
    "AVX2": ("avx2",), "AVX-512": ("avx512f",), "VNNI": ("avx512_vnni", "avx_vnni"),
    "BF16": ("avx512_bf16",), "AMX": ("amx_tile",),
}  # fmt: skip
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Engines whose exports take one side and a classifier's logits (int8 calibration included).
SQUARE_CLASSIFIERS_ONLY = ("torch-int8", *EXECUTORCH_ENGINES, *LITERT_ENGINES)
BUSY_WARNING = 0.25  # cores kept busy by other processes that make the timings suspect


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
    names: list[str],
    model: str,
    width: float,
    explicit: bool = False,
    batch: int = 1,
    square: bool = True,
) -> list[str]:
    """The engines of ``names`` that apply here; unknown ones refused. Those that do not
    apply (torchvision lacks the network, OpenVINO missing, no bf16, a batch above what an
    ExecuTorch program holds, a classifier-only engine for another task or a non-square
    input) are left out, or, for an ``explicit`` request, refused where running them would
    time something else or nothing: ``openvino-bf16`` on a CPU without bf16 (OpenVINO
    would quietly compute in float32), ExecuTorch above its batch bound."""
    from .export.executorch import MAX_BATCH  # (torch, not executorch, is imported)
    from .models import model_task

    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise MobileNetError(f"unknown engine {unknown[0]!r}; choose from: {', '.join(ENGINES)}")
    task = model_task(model)
    if task != "classification" or not square:
        limited = [n for n in names if n in SQUARE_CLASSIFIERS_ONLY]
        if limited and explicit:
            what = f"{task} models" if task != "classification" else "non-square inputs"
            raise MobileNetError(f"{limited[0]} runs square classifiers only, not {what}")
        names = [n for n in names if n not in SQUARE_CLASSIFIERS_ONLY]
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
    if engine in LITERT_ENGINES:
        for module in ("litert_torch", "ai_edge_litert"):
            if not available(module):
                return f"needs {module.replace('_', '-')}: {install_hint('litert')}"
    return None


# --------------------------------------------------------------------------- worker side


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
    # OpenMP's default wait policy: a short spin after each parallel region, then sleep.
    # PASSIVE (sleep at once) made PyTorch at 2 threads 3x slower (mobilenet_v3_large,
    # batch 1: 22.6 against 7.5 ms); the engines take turns, so an idle one's spin is short.
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(cfg.threads)
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
