"""The engines ``mobilenet bench`` times: their names, the benchmark's settings, and how
each engine is built inside its worker process (see :mod:`mobilenet.bench`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .machine import cores

__all__ = [
    "ENGINES",
    "BenchConfig",
    "build_engine",
    "openvino_config",
    "ort_session",
    "timing_model",
]

ENGINES = (
    "eager", "eager-fused", "compile", "onnxruntime", "onnxruntime-int8", "torch-int8",
    "executorch", "executorch-int8", "litert", "litert-int8", "torchvision-eager", "openvino",
    "openvino-bf16",
)  # fmt: skip
TORCHVISION = {"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"}
TORCH_ENGINES = ("eager", "eager-fused", "compile", "torch-int8", "torchvision-eager")
OPENVINO_ENGINES = ("openvino", "openvino-bf16")
ONNX_ENGINES = ("onnxruntime", "onnxruntime-int8", *OPENVINO_ENGINES)  # run the ONNX export
EXECUTORCH_ENGINES = ("executorch", "executorch-int8")
LITERT_ENGINES = ("litert", "litert-int8")


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


def timing_model(name: str, width_mult: float = 1.0, resolution: int = 224, seed: int = 0):
    """Model ``name`` with random weights and BatchNorm statistics measured on 8 random
    images, as a trained network's are measured on its data: its activations are
    unit-scale, where an untrained network's default statistics shrink them towards 0.
    Speed does not depend on the values, but an int8 file's graph does (its calibrated
    ranges decide, for example, where ``qdq.fold_marked_shifts`` applies), so the int8
    file timed is shaped like one of trained weights."""
    import torch

    from .export.onnx import input_size
    from .export.prepare import measure_batchnorm
    from .models import create_model

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    size = input_size(resolution)
    images = (torch.randn(4, 3, *size, generator=generator) for _ in range(2))
    return measure_batchnorm(create_model(name, width_mult=width_mult), images)


def build_engine(engine: str, cfg: BenchConfig, tmp: Path) -> Callable[[], object]:
    """A zero-argument callable that runs one batch with ``engine``."""
    import torch

    from .export import export_onnx, prepare_for_inference
    from .export.onnx import input_size

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    x = torch.randn(cfg.batch, 3, *input_size(cfg.resolution))  # a side, or [height, width]
    if engine == "torchvision-eager":
        import torchvision

        model = getattr(torchvision.models, cfg.model)().eval()
        return lambda: _no_grad(model, x)
    model = timing_model(cfg.model, cfg.width_mult, cfg.resolution)
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
    if engine in LITERT_ENGINES:
        return _litert_engine(engine, model, cfg, x, tmp)
    path = tmp / "model.onnx"
    export_onnx(model, path, cfg.resolution)
    if engine in OPENVINO_ENGINES:
        import openvino

        config = openvino_config(engine, cfg.threads)
        request = openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()
        images = x.numpy()
        return lambda: request.infer({0: images})
    if engine == "onnxruntime-int8":
        from .export.quantize import float_modules, quantize_file

        # the file `quantize` writes: the modules it keeps in float32 stay so here too
        keep = float_modules(cfg.model)
        quantize_file(path, tmp / "model.int8.onnx", _random_batches(cfg.resolution), keep)
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


def _litert_engine(engine: str, model, cfg: BenchConfig, x, tmp: Path) -> Callable[[], object]:
    """The model as a LiteRT model (int8: full-integer, calibrated like the other int8
    engines) in the LiteRT interpreter on ``cfg.threads`` threads."""
    import torch

    from .export.litert import export_tflite, export_tflite_int8, read_tflite

    path = tmp / "model.tflite"
    if engine == "litert-int8":
        calibration = (torch.randn(1, 3, cfg.resolution, cfg.resolution) for _ in range(8))
        export_tflite_int8(model, calibration, path, cfg.resolution)
    else:
        export_tflite(model, path, cfg.resolution)
    run, _ = read_tflite(path, threads=cfg.threads)
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
