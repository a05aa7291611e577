"""``mobilenet bench``: every inference engine timed in the same run, interleaved.

Each engine runs in a process of its own (so its peak memory is its own and allocator
state does not leak between engines); the processes take turns, one timing round each,
after a warm-up, so that the machine's load affects all of them alike. Reported: the
median latency per batch, images per second, the ratio to the best peer (the fastest
other engine of the run) and to eager PyTorch, each process's peak resident memory, the
CPU with its ISA features, and the cores other processes kept busy meanwhile.

Every engine times the same random weights, whose BatchNorm statistics are measured on
random images (:func:`~mobilenet.bench.timing_model`): activations are then
unit-scale as in a trained network, and the int8 engines' files, whose graphs depend on the
calibrated ranges, are shaped like those of trained weights.

Fair to every engine: PyTorch keeps freed memory (:mod:`mobilenet.train.cpu`: glibc
otherwise unmaps the activations after every call, 31.3 instead of 16.9 ms at batch 1);
``openvino`` is float32 (OpenVINO's default is bf16 where the CPU has it: ``openvino-bf16``);
ONNX Runtime's idle threads sleep instead of spinning when its threads fill the free cores.

The engines are those of the file formats (:func:`mobilenet.formats.engines`): PyTorch's
(``eager``, ``eager-fused``, ``compile``, ``torch-int8``, ``torchvision-eager``) and each
format's runtime, float32 and int8 (``onnxruntime``, ``executorch``, ``litert``, ...).
An engine whose format's extra is not installed is not started: it is listed as failed
with the ``pip install`` to run.
"""

from .run import BUSY_WARNING, check_engines, engine_rows, format_table, missing_extra, run_bench
from .setup import ENGINES, BenchConfig, build_engine, timing_model

__all__ = [
    "BUSY_WARNING",
    "ENGINES",
    "BenchConfig",
    "build_engine",
    "check_engines",
    "engine_rows",
    "format_table",
    "missing_extra",
    "run_bench",
    "timing_model",
]
