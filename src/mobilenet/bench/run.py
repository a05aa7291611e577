"""The run of ``mobilenet bench``: the engines' worker processes, the interleaved timing
rounds, and the table of results."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import MobileNetError
from ..extras import install_hint
from ..formats import BenchCase, engines
from ..machine import cpu, free_cores, load_snapshot, others_since
from .setup import BenchConfig, build_engine

__all__ = [
    "BUSY_WARNING",
    "check_engines",
    "engine_rows",
    "format_table",
    "missing_extra",
    "run_bench",
    "worker",
]

BUSY_WARNING = 0.25  # cores kept busy by other processes that make the timings suspect


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
    apply (torchvision lacks the network, no bf16, a batch above what an ExecuTorch
    program holds, a classifier-only engine for another task or a non-square input) are
    left out, or, for an ``explicit`` request, refused where running them would time
    something else or nothing (each engine's ``refuses`` says why)."""
    known = engines()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MobileNetError(f"unknown engine {unknown[0]!r}; choose from: {', '.join(known)}")
    case = BenchCase(model, width, batch, square)
    kept = []
    for name in names:
        engine = known[name]
        reason = engine.refuses(case)
        if reason and explicit:
            raise MobileNetError(reason)
        if reason is None and engine.applies(case):
            kept.append(name)
    return kept


def missing_extra(engine: str) -> str | None:
    """Why ``engine`` cannot run in this install (an extra not installed), or None."""
    from ..extras import available

    found = engines()[engine]
    for module in found.modules:
        if not available(module):
            hint = install_hint(found.extra) if found.extra else "not installed"
            return f"needs {module.replace('_', '-')}: {hint}"
    return None


# --------------------------------------------------------------------------- worker side


def worker(engine: str, cfg: BenchConfig) -> None:
    """One engine's process: builds it, warms it up, says ``ready``, then times the
    number of calls each line of stdin asks for and answers each with a JSON line."""
    kept = False
    if engines()[engine].format is None:  # PyTorch: as training does (mobilenet.train.cpu)
        from ..train.cpu import keep_freed_memory

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
    from ..limits import check_memory, meta_model

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
