"""The int8 files the toolkit writes against each runtime's own documented int8 recipe, on
the same weights: batch 1, one thread, side by side in one interleaved run.

ExecuTorch: the ``.pte`` of ``export_pte_int8`` (what ``mobilenet quantize --format pte``
writes; also with the batch range ``max_batch=MAX_BATCH``, to record what the range costs)
against the recipe of ExecuTorch's XNNPACK documentation, written here with executorch's
public API only: ``torch.export`` at a static batch of 1, PT2E (``prepare_pt2e``, the
calibration images, ``convert_pt2e``) with ``XNNPACKQuantizer`` and
``get_symmetric_quantization_config(is_per_channel=True)``, ``torch.export`` of the
quantized model, ``to_edge_transform_and_lower`` with ``XnnpackPartitioner``,
``to_executorch``. Every program runs in ``executorch.runtime`` on one thread.

OpenVINO, where ``mobilenet.formats.openvino`` and the ``openvino`` extra (with NNCF) are
installed: the int8 IR of ``mobilenet quantize --format openvino``, read back as ``eval``
reads it, against NNCF's documented default: ``openvino.convert_model`` of the model at
its example input, ``nncf.quantize`` with its default settings. Both are compiled by the
CPU plugin with the same settings (one thread, latency hint, float32 precision pinned:
the plugin would pick bf16 on a CPU that has it) and run through a bare infer request.
Where the toolkit's int8 check refuses to write the IR, the record says so instead.

Weights are random with BatchNorm statistics measured on random images
(:func:`mobilenet.bench.timing_model`); every int8 file of a model is calibrated
on the same 8 random images (noise written as PNG files, read back with the model's eval
preprocessing, since ``quantize --format openvino`` calibrates on a folder). Each round
times ``--calls`` calls of every variant, in an order drawn anew for the round; a
variant's time is the median over rounds of the round's median call. A ratio is the
median over rounds of the variant's time over its runtime's recipe's in the same round,
with its quartiles. The recipe's file is also loaded a second time and timed as a variant
of its own (", loaded again"): the same program in another place in memory, whose ratio
is how far apart two copies of one file time here. Wall time is what counts; CPU time
(the process's, all of whose work runs on the one thread) is recorded beside it, less
moved by other processes on a shared machine, whose load is recorded too (load average
before and after, and the cores they kept busy during the run).

    OMP_NUM_THREADS=1 python benchmarks/runtime_recipes.py [--models ...] [--rounds 80]

writes ``benchmarks/runtime_recipes.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mobilenet.bench import timing_model
from mobilenet.deployed import Trained
from mobilenet.errors import MobileNetError
from mobilenet.export.calibration import calibration_batches, calibration_dataset
from mobilenet.export.executorch import MAX_BATCH, export_pte_int8, set_pte_threads
from mobilenet.machine import cpu, load_snapshot, machine, others_since

MODELS = ("mobilenet_v3_large", "mobilenet_v2")
RESOLUTION = 224
CALIBRATION_IMAGES = 8
PTE_RECIPE = "executorch recipe"
OPENVINO_RECIPE = "nncf default"
AGAIN = ", loaded again"  # the recipe's file a second time: how far one file is from itself

Run = Callable[[], object]


# --------------------------------------------------------------------------- the weights


def calibration_folder(folder: Path, seed: int = 0) -> Path:
    """8 noise images (256x256, two class folders): the eval preprocessing crops them to
    224 and normalises them to unit scale, as a trained network's inputs are."""
    rng = np.random.default_rng(seed)
    for index in range(CALIBRATION_IMAGES):
        class_dir = folder / f"class{index % 2}"
        class_dir.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(class_dir / f"{index}.png")
    return folder


def trained_model(name: str) -> Trained:
    model = timing_model(name, resolution=RESOLUTION)
    classes = [f"class{i}" for i in range(model.config.num_classes)]
    return Trained(model, classes, RESOLUTION)


def calibration_images(trained: Trained, folder: Path) -> list[torch.Tensor]:
    """The folder's images as the toolkit's quantizers read them, one image per batch."""
    dataset = calibration_dataset(trained, str(folder))
    batches = calibration_batches(dataset, CALIBRATION_IMAGES, torch.Generator().manual_seed(0))
    return [image[None] for batch in batches for image in batch]


# --------------------------------------------------------------------------- ExecuTorch


def executorch_recipe(model: torch.nn.Module, images: list[torch.Tensor], path: Path) -> None:
    """ExecuTorch's documented int8 recipe for XNNPACK, public API only."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    sample = (torch.randn(1, 3, RESOLUTION, RESOLUTION),)
    quantizer = XNNPACKQuantizer()
    quantizer.set_global(get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = torch.export.export(model.eval(), sample).module()
        prepared = prepare_pt2e(captured, quantizer)
        with torch.no_grad():
            for image in images:
                prepared(image)
        converted = convert_pt2e(prepared)
        program = torch.export.export(converted, sample)
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        path.write_bytes(lowered.to_executorch().buffer)


def pte_runner(path: Path, x: torch.Tensor) -> Run:
    """``forward`` of a .pte in executorch.runtime, bare (the toolkit's reader adds a
    batch check and a copy of the input: the same for every file, and not the file)."""
    from executorch.runtime import Runtime

    data = path.read_bytes()
    program = Runtime.get().load_program(data)
    method = program.load_method("forward")
    # _keep: the method points into its program and the program into the bytes
    return lambda _keep=(program, data): method.execute([x])


def pte_variants(trained: Trained, images: list[torch.Tensor], tmp: Path, x) -> dict[str, Run]:
    paths = {
        PTE_RECIPE: tmp / "recipe.pte",
        "toolkit .pte": tmp / "toolkit.pte",
        f"toolkit .pte, batch 1-{MAX_BATCH}": tmp / "toolkit-range.pte",
    }
    model = trained.model
    export_pte_int8(model, iter(images), paths["toolkit .pte"], RESOLUTION)
    export_pte_int8(model, iter(images), paths[f"toolkit .pte, batch 1-{MAX_BATCH}"], RESOLUTION,
                    max_batch=MAX_BATCH)  # fmt: skip
    executorch_recipe(model, images, paths[PTE_RECIPE])
    set_pte_threads(1)  # before any program is loaded (see set_pte_threads)
    paths[PTE_RECIPE + AGAIN] = paths[PTE_RECIPE]
    return {name: pte_runner(path, x) for name, path in paths.items()}


# --------------------------------------------------------------------------- OpenVINO


def openvino_ready() -> bool:
    """OpenVINO's variants run where the toolkit's OpenVINO format and NNCF are present."""
    names = ("mobilenet.formats.openvino", "openvino", "nncf")
    return all(importlib.util.find_spec(name) is not None for name in names)


OPENVINO_CONFIG = {
    "INFERENCE_NUM_THREADS": 1,
    "PERFORMANCE_HINT": "LATENCY",
    "INFERENCE_PRECISION_HINT": "f32",
}


def nncf_default(model: torch.nn.Module, images: list[torch.Tensor]):
    """NNCF's documented post-training quantization of an OpenVINO model, its defaults."""
    import nncf
    import openvino

    example = torch.randn(1, 3, RESOLUTION, RESOLUTION)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # progress bars
        warnings.simplefilter("ignore")
        graph = openvino.convert_model(model.eval(), example_input=example)
        quantized = nncf.quantize(graph, nncf.Dataset([image.numpy() for image in images]))
    return quantized


def openvino_variants(trained: Trained, folder: Path, images, tmp: Path, x) -> dict[str, Run]:
    """The toolkit's int8 IR (written by its quantize, read by its load) and NNCF's."""
    import openvino

    from mobilenet.formats import LoadRequest, QuantizeRequest
    from mobilenet.formats.openvino import FORMAT

    path = tmp / "toolkit.xml"
    request = QuantizeRequest(str(folder), path, CALIBRATION_IMAGES, progress=lambda _: None)
    FORMAT.quantize(trained, request)
    torch.set_num_threads(1)  # the loader compiles on PyTorch's thread count
    quantized, core = nncf_default(trained.model, images), openvino.Core()
    compiled = {
        OPENVINO_RECIPE: core.compile_model(quantized, "CPU", OPENVINO_CONFIG),
        "toolkit IR": FORMAT.load(path, LoadRequest()).model.compiled,
        OPENVINO_RECIPE + AGAIN: core.compile_model(quantized, "CPU", OPENVINO_CONFIG),
    }
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    images_in = x.numpy()
    return {name: (lambda r=r: r.infer({0: images_in})) for name, r in requests.items()}


# --------------------------------------------------------------------------- timing


def interleaved(runs: dict[str, Run], rounds: int, calls: int) -> dict[str, dict[str, list]]:
    """Each round times ``calls`` calls of every variant, in an order drawn anew for the
    round (seeded); per round and variant, the median call (wall and process CPU time,
    in ms)."""
    for run in runs.values():
        for _ in range(5):  # warm-up: first calls allocate, pack and page in
            run()
    times = {name: {"wall": [], "cpu": []} for name in runs}
    names, order = list(runs), random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            run, wall, cpu_s = runs[name], [], []
            for _ in range(calls):
                c, t = time.process_time(), time.perf_counter()
                run()
                wall.append(time.perf_counter() - t)
                cpu_s.append(time.process_time() - c)
            times[name]["wall"].append(1000 * statistics.median(wall))
            times[name]["cpu"].append(1000 * statistics.median(cpu_s))
    return times


def summary(times: dict[str, dict[str, list]], recipe: str) -> dict[str, dict]:
    rows = {}
    for name, t in times.items():
        row = {f"{k}_ms": round(statistics.median(v), 3) for k, v in t.items()}
        for k in ("wall", "cpu"):
            ratios = [a / b for a, b in zip(t[k], times[recipe][k], strict=True)]
            q = statistics.quantiles(ratios, n=4)
            row[f"{k}_over_recipe"] = round(statistics.median(ratios), 3)
            row[f"{k}_over_recipe_quartiles"] = [round(q[0], 3), round(q[2], 3)]
        rows[name] = row
    return rows


def measure(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    torch.manual_seed(0)
    trained = trained_model(name)
    folder = calibration_folder(tmp / "calibration")
    images = calibration_images(trained, folder)
    x = torch.randn(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    runs = pte_variants(trained, images, tmp, x)
    recipes = {name: PTE_RECIPE for name in runs}
    refused = None
    if openvino_ready():
        try:
            ov_runs = openvino_variants(trained, folder, images, tmp, x)
        except MobileNetError as e:  # the toolkit's int8 check refused to write its IR
            refused = f"toolkit IR: {e}"
        else:
            recipes.update({name: OPENVINO_RECIPE for name in ov_runs})
            runs.update(ov_runs)
    load_before, start = os.getloadavg(), load_snapshot()
    times = interleaved(runs, args.rounds, args.calls)
    busy = others_since(start)
    rows = {}
    for recipe in sorted(set(recipes.values())):
        mine = {k: v for k, v in times.items() if recipes[k] == recipe}
        rows.update(summary(mine, recipe))
    return {
        "model": name,
        "variants": rows,
        "not_written": refused,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "busy_other_cores": None if busy is None else round(busy, 2),
        "round_medians_ms": times,
    }


def versions() -> dict[str, str]:
    names = ("torch", "executorch", "torchao", "openvino", "nncf")
    found = {}
    for package in names:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--calls", type=int, default=10)
    default_json = Path(__file__).with_name("runtime_recipes.json")
    parser.add_argument("--json", type=Path, default=default_json)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(name, args, Path(tmp))
        rows.append(row)
        for variant, r in row["variants"].items():
            wall, cpu_ms = r["wall_ms"], r["cpu_ms"]
            print(f"{name:<20} {variant:<28} {wall:8.3f} ms  x{r['wall_over_recipe']:.3f}"
                  f"   cpu {cpu_ms:8.3f} ms  x{r['cpu_over_recipe']:.3f}", flush=True)  # fmt: skip
        if row["not_written"]:
            print(f"{name:<20} not written: {row['not_written']}", flush=True)
        print(f"{name:<20} load {row['load_average_before']} -> {row['load_average_after']}, "
              f"other processes kept {row['busy_other_cores']} cores busy", flush=True)  # fmt: skip
    record = {
        "command": " ".join(["OMP_NUM_THREADS=1 python", *sys.argv]),
        "machine": machine(),
        "cpu": cpu(),
        "versions": versions(),
        "batch": 1,
        "threads": 1,
        "resolution": RESOLUTION,
        "rounds": args.rounds,
        "calls_per_round": args.calls,
        "openvino": openvino_ready(),
        "rows": rows,
    }
    args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
