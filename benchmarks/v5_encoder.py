"""Record MobileNetV5-300M's encoder (``mobilenet_v5_300m_enc``, Gemma 3n's vision tower:
294M parameters, 435 GMACs at 768) on the engines that run it: latency and peak memory
at 768 and 512, 1 and 2 threads, and the int8 file's cosine similarity to the float
encoder's map on real photographs (``skimage.data``). Writes benchmarks/v5_encoder.json.

    python benchmarks/v5_encoder.py [--budget-min 25] [--runs 1] [--plan default|full]

Each point (engine, resolution, threads) runs in a fresh process that loads the model or
file, runs it once to warm up, then times ``--runs`` calls: its latency is their median,
its peak memory that process's peak RSS (``ru_maxrss``, as ``mobilenet bench``'s
workers report it), loading included. The files are written first, each by its own
process, by the exporters ``mobilenet export`` runs (each checked by its runtime against
PyTorch before the write). Weights are random (seeded) with random norm scales, layer
scales and biases: Gemma 3n's trained weights are not on the machine; latency and memory
do not depend on them, the int8 cosine does (it measures this network's rounding).

The int8 file is ONNX Runtime's (``mobilenet.export.quantize.quantize_file``, what
``mobilenet quantize --format onnx`` writes), calibrated on four other photographs. The
full grid takes hours on a shared 2-core machine (a float ``.pte`` alone takes ExecuTorch
minutes to lower, an int8 one tens of minutes); steps run in the order of ``PLAN`` while
the budget lasts, and every point not run is recorded with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mobilenet.fileio import atomic_write
from mobilenet.machine import cpu, load_snapshot, machine, others_since

HERE = Path(__file__).parent
MODEL = "mobilenet_v5_300m_enc"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # the cosine's
CALIBRATION = ("immunohistochemistry", "hubble_deep_field", "retina", "stereo_motorcycle")
SUFFIX = {"onnx": ".onnx", "tflite": ".tflite", "pte": ".pte", "onnx-int8": ".int8.onnx"}
# The engine of each file kind, and the file each engine runs (None: PyTorch in process).
ENGINE_FILE = {
    "eager": None,
    "onnxruntime": "onnx",
    "openvino": "onnx",
    "litert": "tflite",
    "executorch": "pte",
    "onnxruntime-int8": "onnx-int8",
}
# Steps in order of priority: ("file", kind, res) writes a file, ("point", engine, res,
# threads) times one, ("cosine", res) compares the int8 file's maps with PyTorch's.
DEFAULT_PLAN = [
    ("point", "eager", 512, 2),
    ("point", "eager", 768, 2),
    ("file", "onnx", 512),
    ("point", "onnxruntime", 512, 2),
    ("point", "openvino", 512, 2),
    ("file", "onnx", 768),
    ("point", "onnxruntime", 768, 2),
    ("point", "openvino", 768, 2),
    ("file", "tflite", 512),
    ("point", "litert", 512, 2),
    ("file", "onnx-int8", 512),
    ("point", "onnxruntime-int8", 512, 2),
    ("cosine", 512),
    ("file", "tflite", 768),
    ("point", "litert", 768, 2),
]
ALL_POINTS = [
    (engine, res, threads)
    for engine in ENGINE_FILE
    for res in (768, 512)
    for threads in (1, 2)
    if not (engine == "onnxruntime-int8" and res == 768)
]
FULL_PLAN = [
    *DEFAULT_PLAN,
    *(("point", *p) for p in ALL_POINTS if p[2] == 1),
    ("file", "pte", 512),
    ("point", "executorch", 512, 2),
    ("file", "pte", 768),
    ("point", "executorch", 768, 2),
]


# --------------------------------------------------------------------------- children


def encoder() -> torch.nn.Module:
    """The full encoder, seeded random weights, random norm scales, layer scales, biases."""
    from mobilenet import create_model

    torch.manual_seed(0)
    model = create_model(MODEL, width_mult=width())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale.gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def photos(names: tuple[str, ...], res: int) -> torch.Tensor:
    """``skimage.data`` photographs, preprocessed as the encoder's files say (shorter side
    to ``res``, centre crop, bicubic, pixels in [0, 1])."""
    import skimage.data
    from PIL import Image

    from mobilenet.data.published import model_preprocess

    transform = model_preprocess(encoder_meta(), res).transform()
    images = []
    for name in names:
        pixels = getattr(skimage.data, name)()
        pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # a stereo pair
        images.append(transform(Image.fromarray(pixels[..., :3]).convert("RGB")))
    return torch.stack(images)


def encoder_meta() -> torch.nn.Module:
    from mobilenet.limits import meta_model

    return meta_model(MODEL, width_mult=width())


def width() -> float:
    """The width the driver asked for (1.0: the encoder itself; less for a smoke test)."""
    return float(os.environ.get("V5_ENCODER_WIDTH", "1.0"))


def write_file(kind: str, res: int, out: Path, source: Path | None) -> dict:
    """One file, by the exporter ``mobilenet export`` (or ``quantize``) runs."""
    from mobilenet.card import ModelCard

    start = time.perf_counter()
    if kind == "onnx-int8":
        from mobilenet.export.quantize import quantize_file

        batches = iter([{"images": photos(CALIBRATION, res).numpy()}])
        quantize_file(source, out, batches)
        return {"seconds": time.perf_counter() - start, "bytes": out.stat().st_size}
    model = encoder()
    card = ModelCard(config=model.config.to_dict(), task="encoder", input_size=(res, res))
    if kind == "onnx":
        from mobilenet.export.onnx import export_onnx

        diff = export_onnx(model, out, res, metadata=card.metadata())
    elif kind == "tflite":
        from mobilenet.export.litert import export_tflite

        diff = export_tflite(model, out, res, card.metadata())
    else:
        from mobilenet.export.executorch import export_pte

        diff = export_pte(model, out, res, card.metadata())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": out.stat().st_size, "max_abs_diff": diff}


def runner(engine: str, res: int, threads: int, path: Path | None):
    """A zero-argument call that runs the encoder once on one image."""
    torch.set_num_threads(threads)
    x = torch.rand(1, 3, res, res, generator=torch.Generator().manual_seed(1))
    if path is None:
        from mobilenet.export import prepare_for_inference

        model = prepare_for_inference(encoder())
        x = x.contiguous(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                return model(x)

        return run
    if engine.startswith("onnxruntime"):
        from mobilenet.formats.onnx import ort_session

        session, feed = ort_session(path, threads, spin=False), {"images": x.numpy()}
        return lambda: session.run(None, feed)
    if engine == "openvino":
        import openvino as ov

        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        config["INFERENCE_PRECISION_HINT"] = "f32"  # not the plugin's bf16 default
        request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
        return lambda: request.infer({0: x.numpy()})
    if engine == "litert":
        from mobilenet.export.litert import read_tflite

        run, _ = read_tflite(path, threads=threads)
        return lambda: run(x)
    from mobilenet.export.executorch import read_pte, set_pte_threads

    set_pte_threads(threads)  # before the load
    run, _ = read_pte(path)
    return lambda: run(x)


def time_point(engine: str, res: int, threads: int, path: Path | None, runs: int) -> dict:
    start = load_snapshot()
    run = runner(engine, res, threads, path)
    run()  # warm-up
    times = []
    for _ in range(runs):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return {
        "latency_s": statistics.median(times),
        "times_s": times,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "busy_other_cores": others_since(start),
        "load_average": os.getloadavg()[0],
    }


def cosine(res: int, path: Path) -> dict:
    """The int8 file's map against PyTorch's float encoder on the photographs: the whole
    map's cosine similarity, and each of the 256 tokens' (2048 channels) mean and least;
    run as ``eval`` runs an int8 ONNX file (this CPU's int8 kernels where they compute
    the file's arithmetic, else its QDQ graph in float32: ``ran_on`` says which)."""
    from mobilenet.export.onnx_int8 import runnable_int8_session
    from mobilenet.formats.onnx import ort_session

    images = photos(PHOTOS, res)
    said: list[str] = []
    session = runnable_int8_session(  # what eval would run: see mobilenet.export.onnx_int8
        path,
        ort_session(path, torch.get_num_threads(), spin=False),
        (res, res),
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        warn=said.append,
        scores=False,
    )
    ours = torch.cat(
        [torch.from_numpy(session.run(None, {"images": x[None].numpy()})[0]) for x in images]
    )
    with torch.inference_mode():
        exact = torch.cat([encoder()(x[None]) for x in images])
    cos = torch.nn.functional.cosine_similarity
    rows = {}
    for name, a, b in zip(PHOTOS, ours, exact, strict=True):
        tokens = cos(a.flatten(1).T, b.flatten(1).T)  # [256]
        rows[name] = {
            "map": float(cos(a.flatten(), b.flatten(), dim=0)),
            "tokens_mean": float(tokens.mean()),
            "tokens_min": float(tokens.min()),
            "relative_rms_error": float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()),
        }
    rows["ran_on"] = "the QDQ graph in float32: " + said[0] if said else "int8 kernels"
    return rows


def child(argv: list[str]) -> None:
    """One step in this process; its JSON result on the last line of stdout."""
    step, rest = argv[0], argv[1:]
    if step == "file":
        kind, res, out, source = rest[0], int(rest[1]), Path(rest[2]), rest[3]
        result = write_file(kind, res, out, Path(source) if source != "-" else None)
    elif step == "point":
        engine, res, threads, path, runs = (
            rest[0],
            int(rest[1]),
            int(rest[2]),
            rest[3],
            int(rest[4]),
        )
        result = time_point(engine, res, threads, None if path == "-" else Path(path), runs)
    else:
        torch.set_num_threads(2)
        result = cosine(int(rest[0]), Path(rest[1]))
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- driver


def run_child(args: list[str], timeout: float) -> tuple[dict | None, str | None]:
    """``args`` in a fresh process: its result, or why there is none."""
    command = [sys.executable, __file__, "--child", *args]
    env = {**os.environ, "OMP_NUM_THREADS": args[3] if args[0] == "point" else "2"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"not done within the {timeout / 60:.0f} minutes left of the budget"
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
        return None, f"failed: {tail[0][:300] if tail else done.returncode}"
    return json.loads(lines[-1]), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=25.0)
    parser.add_argument("--runs", type=int, default=1, help="timed calls per point")
    parser.add_argument("--plan", choices=["default", "full"], default="default")
    parser.add_argument("--width", type=float, default=1.0, help="less: a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "v5_encoder.json")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    plan = FULL_PLAN if args.plan == "full" else DEFAULT_PLAN
    os.environ["V5_ENCODER_WIDTH"] = str(args.width)  # the children's
    record = {
        "model": MODEL,
        "width_mult": args.width,
        "command": "python benchmarks/v5_encoder.py "
        + f"--budget-min {args.budget_min:g} --runs {args.runs} --plan {args.plan}"
        + (f" --width {args.width:g}" if args.width != 1.0 else ""),
        "machine": machine(),
        "cpu": cpu(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "weights": "random (seed 0), random norm scales, layer scales and biases",
        "batch": 1,
        "runs_per_point": args.runs,
    }
    with tempfile.TemporaryDirectory() as tmp:
        record.update(run_plan(plan, Path(tmp), args.budget_min * 60, args.runs))
    record["load_average_at_end"] = round(os.getloadavg()[0], 2)
    atomic_write(args.out, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    print(f"wrote {args.out}")


def run_plan(plan: list, folder: Path, budget: float, runs: int) -> dict:
    """The steps of ``plan`` while ``budget`` seconds last; then every point of the grid
    not measured, with why."""
    start = time.perf_counter()
    files, points, missing, cosines = {}, {}, {}, None
    for step in plan:
        left = budget - (time.perf_counter() - start)
        kind, *spec = step
        key = "/".join(map(str, spec))
        if left < 60:
            missing[key] = "not run: the time budget was spent"
            continue
        if kind == "file":
            name, res = spec
            out = folder / f"enc{res}{SUFFIX[name]}"
            source = str(folder / f"enc{res}.onnx") if name == "onnx-int8" else "-"
            result, why = run_child(["file", name, str(res), str(out), source], left)
            files[key] = result or {"not written": why}
        elif kind == "point":
            engine, res, threads = spec
            needs = ENGINE_FILE[engine]
            path = folder / f"enc{res}{SUFFIX[needs]}" if needs else None
            if path is not None and not path.exists():
                missing[key] = f"not run: no {needs} file at {res} ({files.get(f'{needs}/{res}')})"
                continue
            args = ["point", engine, str(res), str(threads), str(path or "-"), str(runs)]
            result, why = run_child(args, left)
            if result is None:
                missing[key] = why
            else:
                points[key] = result
            print(key, json.dumps(result or why), flush=True)
        else:
            path = folder / f"enc{spec[0]}{SUFFIX['onnx-int8']}"
            cosines, why = (
                run_child(["cosine", str(spec[0]), str(path)], left)
                if path.exists()
                else (None, "no int8 file")
            )
            cosines = cosines or {"not measured": why}
    for engine, res, threads in ALL_POINTS:
        key = f"{engine}/{res}/{threads}"
        if key not in points and key not in missing:
            missing[key] = "not run: outside this plan (the full grid does not fit the budget)"
    return {"files": files, "points": points, "not_run": missing, "int8_cosine_on_photos": cosines}


if __name__ == "__main__":
    main()
