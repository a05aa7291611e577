"""What reading a file safely costs: the checks' share of a cold ``mobilenet predict``.

mobilenet_v3_large (1,000 classes, 224x224, BatchNorm statistics measured on random
images) is saved as our safetensors and exported to ``.onnx``, ``.pt2``, ``.pte`` and
``.tflite``. Each round runs, for every format in turn (interleaved), one cold
``mobilenet predict --weights FILE IMAGE`` in a fresh process: the whole command, from the
interpreter's start to its exit, as a user waits for it. In that process the functions
that check a file before it is used are wrapped by timers:

  mobilenet.integrity:check_seal          the file's SHA-256 against the one it carries
  mobilenet.native:verify_in_child        a .pte/.tflite's verdict (a child process the
                                          first time a file is seen, then the cache)
  mobilenet.export.pt2:_inspect           a .pt2's archive, names, expressions, digest
  mobilenet.deployed:_output_count        a .pte/.tflite run once on a blank image: its
                                          class count against its metadata

The checks' share is their time over the command's; the first run of each file (its
verdict not yet cached: one child process that loads and runs it) is reported apart.
The CPU, its ISA and the cores other processes kept busy are recorded.

    python benchmarks/load_checks.py [--rounds 5] [--out benchmarks/load_checks.json]
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
FORMATS = (".safetensors", ".onnx", ".pt2", ".pte", ".tflite")
CHECKS = (
    "mobilenet.integrity:check_seal",
    "mobilenet.native:verify_in_child",
    "mobilenet.export.pt2:_inspect",
    "mobilenet.deployed:_output_count",
)
# Run in the measured process: wrap every check by a timer wherever a module holds it,
# then run the command; the checks' seconds are printed last, on stderr.
TIMED = """
import atexit, importlib, sys, time
spent = [0.0]
def timed(function):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start
    return wrapper
modules = sys.argv[1].split(",")
checks = sys.argv[2].split(",")
for name in modules:
    importlib.import_module(name)
def install(check):
    module, _, name = check.partition(":")
    target = getattr(importlib.import_module(module), name, None)
    if target is None:
        return
    wrapper = timed(target)
    for held in list(sys.modules.values()):
        if held is None or held.__name__ == "__main__":
            continue
        for key, value in list(vars(held).items()):
            if value is target:
                setattr(held, key, wrapper)
for check in checks:
    install(check)
atexit.register(lambda: print(f"checks_s {spent[0]:.6f}", file=sys.stderr))
from mobilenet.cli import main
code = main(sys.argv[3:])
sys.stdout.flush()
raise SystemExit(code)
"""
# The modules a format's loading imports anyway: imported before the checks are wrapped.
MODULES = {
    ".safetensors": "mobilenet.weights",
    ".onnx": "mobilenet.export.onnx",
    ".pt2": "mobilenet.export.pt2",
    ".pte": "mobilenet.export.executorch",
    ".tflite": "mobilenet.export.litert",
}


def build(folder: Path) -> dict[str, Path]:
    import numpy as np
    import torch
    from PIL import Image

    from mobilenet import create_model
    from mobilenet.cli import main
    from mobilenet.export.prepare import measure_batchnorm
    from mobilenet.weights import save_weights

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_large")
    measure_batchnorm(model, [torch.randn(8, 3, 224, 224)])
    files = {".safetensors": save_weights(model, folder / "model.safetensors")}
    for suffix in FORMATS[1:]:
        out = folder / f"model{suffix}"
        if main(["export", "--weights", str(files[".safetensors"]), "--out", str(out)]) != 0:
            raise SystemExit(f"export to {suffix} failed")
        files[suffix] = out
    image = folder / "image.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(image)
    files["image"] = image
    return files


def cold_predict(path: Path, image: Path, env: dict[str, str]) -> tuple[float, float]:
    """(the command's wall seconds, the checks' seconds) of one fresh process."""
    modules = ",".join(["mobilenet.integrity", "mobilenet.native", MODULES[path.suffix]])
    command = [sys.executable, "-c", TIMED, modules, ",".join(CHECKS), "predict",
               "--weights", str(path), str(image)]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = result.stderr.strip().splitlines()
    if result.returncode != 0 or not lines or not lines[-1].startswith("checks_s "):
        raise SystemExit(f"predict on {path} failed: {result.stderr[-2000:]}")
    return wall, float(lines[-1].split()[1])


def main() -> None:
    from mobilenet.machine import cpu, load_snapshot, others_since

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "load_checks.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = build(folder)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MOBILENET_HOME": str(folder / "home")}
        start = load_snapshot()
        first = {s: cold_predict(files[s], files["image"], env) for s in FORMATS}
        runs: dict[str, list[tuple[float, float]]] = {s: [] for s in FORMATS}
        for _ in range(args.rounds):
            for suffix in FORMATS:
                runs[suffix].append(cold_predict(files[suffix], files["image"], env))
        others = others_since(start)
        sizes = {s: files[s].stat().st_size for s in FORMATS}
    results = []
    for suffix in FORMATS:
        walls = [w for w, _ in runs[suffix]]
        checks = [c for _, c in runs[suffix]]
        shares = [c / w for w, c in runs[suffix]]
        results.append(
            {
                "format": suffix,
                "file_mb": round(sizes[suffix] / 2**20, 2),
                "cold_predict_s": round(statistics.median(walls), 3),
                "checks_s": round(statistics.median(checks), 4),
                "checks_share": round(statistics.median(shares), 4),
                "checks_share_max": round(max(shares), 4),
                "first_cold_predict_s": round(first[suffix][0], 3),
                "first_checks_s": round(first[suffix][1], 4),
            }
        )
        row = results[-1]
        print(
            f"{suffix:12s} {row['file_mb']:7.2f} MB  cold predict {row['cold_predict_s']:6.3f} s"
            f"  checks {row['checks_s'] * 1000:7.1f} ms ({100 * row['checks_share']:.2f}%,"
            f" max {100 * row['checks_share_max']:.2f}%)  first run: checks"
            f" {row['first_checks_s']:.2f} s of {row['first_cold_predict_s']:.2f} s"
        )
    record = {
        "benchmark": "the checks' share of a cold mobilenet predict of one image",
        "command": "python benchmarks/load_checks.py " + " ".join(sys.argv[1:]),
        "cpu": cpu(),
        "threads": 1,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
        "other_processes_cores_busy": None if others is None else round(others, 3),
        "model": "mobilenet_v3_large, 1,000 classes, 224x224",
        "rounds": args.rounds,
        "checks": list(CHECKS),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
