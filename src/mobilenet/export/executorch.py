"""Export to an ExecuTorch program (``.pte``) with XNNPACK kernels, for phones and small CPUs.

The inference-prepared model (BatchNorm folded; RMS norms, attention and tanh-GELUs in
the ops XNNPACK lowers whole and right: :func:`mobilenet.export.prepare.delegable_forms`,
unsqueezes as views: :func:`unsqueeze_as_view`) goes through ``torch.export`` at a static
batch of 1 (or, with ``max_batch``, a batch dimension from 1 to ``max_batch``), is lowered
with the XNNPACK partitioner and serialised into memory. Before a byte is written,
ExecuTorch's own Python runtime loads the bytes and runs them on batches of 1 and 3 (in
slices of ``max_batch``), compared with PyTorch (1e-4 on unit-scale logits): what is
written is what a device would run.
The file is sealed with the digest of its bytes (:mod:`mobilenet.integrity`), checked
when it is read; before ExecuTorch builds a file that this process has not just made, it
reads it in a child process (:mod:`mobilenet.native`), where a damaged file that crashes
the runtime's native code takes only the child down.

ExecuTorch plans activation memory for the largest batch at export time, so the batch is
bounded, and the bound (``max_batch``) is stored in the file; readers run larger batches
in slices of it. The default is one image, as in ExecuTorch's own XNNPACK recipe: the int8
program then holds the recipe's XNNPACK graph, node for node (same weights, scales and
zero points, compared for MobileNetV3-Large), and runs as fast
(``benchmarks/runtime_recipes.py``). A batch range changes the program: the flatten
before the classifier takes the batch as a symbol, which XNNPACK does not lower, so the
classifier runs in a second delegate behind a view in ExecuTorch, and the graph is built
for the largest batch. That was the only difference from the recipe's program, which a
Zen 5 was reported to run 9% faster (MobileNetV3-Large at batch 1, one thread); on the
AVX2-only AMD EPYC of the record both time alike, within 1%. A range (up to :data:`MAX_BATCH`, which
keeps the plan small for a phone: about 40 MB for mobilenet_v2 at 224) is for batch
work, where a batch of 8 costs less per image (about 7% for V3-Large on that EPYC).

The ``.pte`` flatbuffer has no free-form metadata slot, but a program may hold *constant
methods* (methods that return a value; ExecuTorch's LLM exports keep their settings this
way). The model's config, classes and resolution are a JSON string returned by the method
``mobilenet_metadata``, so no sidecar file is needed.

int8 (:func:`export_pte_int8`) is PT2E quantization with the XNNPACK quantizer (int8
weights per output channel, int8 activations), calibrated on the caller's images, then
lowered the same way and checked against the quantized PyTorch reference it came from.
The quantizer has no h-swish, so V3's h-swish and h-sigmoid run in float between a
dequantize and a quantize; ``integer_only=True`` writes them as add, clamp and multiply
(:func:`mobilenet.export.prepare.integer_activations`), which it quantizes, so every
operator is int8 (what integer-only accelerators need; on XNNPACK's CPU kernels the float
h-swish is the faster one: ``benchmarks/pte_integer_only.py``).
:func:`quantize_pte` (``mobilenet quantize --format pte``) calibrates it on the user's data
as the ONNX quantization does: random images of the training split, evaluation transform.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..card import ModelCard
from ..errors import MobileNetError
from ..extras import require
from ..fileio import read_bytes, write_bytes
from ..integrity import check_seal, note_unsealed, seal, sealed_metadata
from ..native import NativeLog, quiet_native_stderr, record_verified, verify_in_child
from .calibration import calibrated_export, observe
from .check import check_against_pytorch
from .int8_check import SLACK, check_int8
from .metadata import model_metadata, model_name
from .prepare import delegable_forms, integer_activations, prepare_for_inference
from .pt2 import quiet_torch_export_logs
from .pt2_program import first_line

__all__ = [
    "MAX_BATCH",
    "META_METHOD",
    "export_pte",
    "export_pte_int8",
    "probe_pte",
    "quantize_pte",
    "read_pte",
    "set_pte_threads",
    "unsqueeze_as_view",
    "xnnpack_quantizer",
]

FORMAT = "mobilenet-pte"
META_METHOD = "mobilenet_metadata"
MAX_BATCH = 8
# How many times the network's own rounding noise the int8 program may be from the
# quantized PyTorch reference it was lowered from (see mobilenet.export.int8_check).
INT8_SLACK = SLACK

_PURPOSE = "ExecuTorch export (.pte)"


def export_pte(
    model: nn.Module,
    path: str | Path,
    resolution: int = 224,
    metadata: dict[str, str] | None = None,
    max_batch: int = 1,
) -> float:
    """Write ``model`` as an ExecuTorch program (XNNPACK, float32) for batches of 1 to
    ``max_batch`` (default one image: the faster program, see the module's docstring);
    returns the max abs difference between the ExecuTorch runtime and PyTorch, checked
    before the file appears."""
    _require()
    _check_max_batch(max_batch)
    model = model.eval()
    prepared = delegable_forms(prepare_for_inference(model, channels_last=False))
    program = _torch_export(prepared, resolution, model_name(model), max_batch)
    meta = sealed_metadata(_metadata(model, resolution, metadata, "float32", max_batch))
    data = seal(_lower(program, meta, model_name(model)))
    method, _ = read_pte(data, "the exported program", verify=False)
    method = _in_slices(method, max_batch)
    diff = check_against_pytorch(lambda t: _run(method, t), model, resolution, "ExecuTorch")
    write_bytes(path, data)
    record_verified(data, "executorch")  # loaded and run above
    return diff


def export_pte_int8(
    model: nn.Module,
    calibration_batches: Iterable[torch.Tensor],
    path: str | Path,
    resolution: int = 224,
    metadata: dict[str, str] | None = None,
    integer_only: bool = False,
    max_batch: int = 1,
) -> float:
    """Write ``model`` as an int8 ExecuTorch program: PT2E with the XNNPACK quantizer,
    activation ranges observed on ``calibration_batches`` (image tensors of
    ``resolution``, batches of any size); returns the max abs difference between the
    ExecuTorch runtime and the float model, checked (:func:`_check_int8`) before the file
    appears. ``integer_only`` quantizes h-swish and h-sigmoid too; the program takes
    batches of 1 to ``max_batch`` (see the module's docstring)."""
    _check_max_batch(max_batch)
    quantizer = xnnpack_quantizer()
    pt2e = require("torchao.quantization.pt2e.quantize_pt2e", "mobile", _PURPOSE)
    model = model.eval()
    name = model_name(model)
    prepared = delegable_forms(prepare_for_inference(model, channels_last=False))
    if integer_only:
        integer_activations(prepared)
    captured = _torch_export(prepared, resolution, name).module()
    with warnings.catch_warnings(), quiet_torch_export_logs():
        warnings.simplefilter("ignore")
        observed = pt2e.prepare_pt2e(captured, quantizer)
        seen, first = observe(observed, calibration_batches)
        reference = pt2e.convert_pt2e(observed)
    # Calibrated on a batch range (the caller's batches are of any size up to it), then
    # exported again for the program's own batches: the same graph as a capture at them.
    program = _torch_export(reference, resolution, name, max_batch)
    meta = sealed_metadata(_metadata(model, resolution, metadata, "int8", max_batch))
    meta["calibration_images"] = str(seen)
    meta["integer_only"] = "true" if integer_only else "false"
    data = seal(_lower(program, meta, name))
    method, _ = read_pte(data, "the exported int8 program", verify=False)
    diff = _check_int8(_in_slices(method, max_batch), model, reference, first)
    write_bytes(path, data)
    record_verified(data, "executorch")  # loaded and run above
    return diff


def xnnpack_quantizer():
    """The PT2E quantizer :func:`export_pte_int8` uses: XNNPACK's, int8 weights symmetric
    per output channel, int8 activations per tensor (affine). The operators it annotates
    run in int8; the others (with executorch 1.5: h-swish, h-sigmoid and the
    squeeze-excite's mean) stay in float between a dequantize and a quantize."""
    _require()
    xq = require("executorch.backends.xnnpack.quantizer.xnnpack_quantizer", "mobile", _PURPOSE)
    quantizer = xq.XNNPACKQuantizer()
    quantizer.set_global(xq.get_symmetric_quantization_config(is_per_channel=True))
    return quantizer


def quantize_pte(
    trained,
    data: str,
    out: str | Path,
    calibration_images: int = 512,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    integer_only: bool = False,
    max_batch: int = 1,
) -> tuple[int, float]:
    """Write an int8 program of ``trained`` (a :class:`mobilenet.deployed.Trained`) to
    ``out``, calibrated on ``calibration_images`` images of ``data`` drawn at random (all it
    holds when that is fewer: ``progress`` is told); returns how many images were used and
    the program's max abs difference from the float model (see :func:`export_pte_int8`).
    """
    _require()  # before the calibration data is read
    _check_max_batch(max_batch)
    export = functools.partial(export_pte_int8, integer_only=integer_only, max_batch=max_batch)
    args = (trained, data, out, calibration_images, seed, progress)
    return calibrated_export(export, *args)


def read_pte(
    source: str | Path | bytes, name: str = "", verify: bool = True
) -> tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, str]]:
    """The ``forward`` of a ``.pte`` written by :func:`export_pte` (a callable on an image
    batch, checked against the stored batch bound) and its metadata; anything else, or a
    damaged file, is one error.

    The file's digest is checked first, then (``verify``) the runtime reads it in a child
    process (:func:`mobilenet.native.verify_in_child`), once per file: a damaged program
    can crash ExecuTorch's native code. ``verify=False`` is for bytes this process has
    just made."""
    _require()
    from executorch.runtime import Runtime

    what = name or ("the program" if isinstance(source, bytes) else str(source))
    data = read_bytes(source, what)
    if data[4:6] != b"ET":  # the flatbuffer's file identifier, ET and a version: no child
        raise MobileNetError(f"{what}: not a program ExecuTorch can load (not a .pte file)")
    sealed = check_seal(data, what, note=False)  # its note once the file has loaded
    if verify:
        verify_in_child(data, what, "executorch")
    log = NativeLog()
    try:
        with quiet_native_stderr() as log:
            program = Runtime.get().load_program(data)
            names = set(program.method_names)
            if "forward" not in names or META_METHOD not in names:
                raise MobileNetError(f"{what}: not a .pte file written by mobilenet export")
            (text,) = program.load_method(META_METHOD).execute([])
            forward = program.load_method("forward")
    except MobileNetError:
        raise
    except Exception as e:  # the runtime raises RuntimeError, ValueError ... on a bad file
        reason = first_line(e) + log.quote("ExecuTorch")
        raise MobileNetError(f"{what}: not a program ExecuTorch can load ({reason})") from None
    metadata = _parse_metadata(text, what)
    if not sealed:  # a refused file gets one line, not two
        note_unsealed(what)
    max_batch = int(metadata["max_batch"])

    def run(images: torch.Tensor, _keep: tuple = (program, data)) -> torch.Tensor:
        # _keep: the method points into its program and the program into the bytes;
        # neither holds a reference, and freeing them under the method crashes the process.
        if not 1 <= images.shape[0] <= max_batch:
            size = "one image" if max_batch == 1 else f"1 to {max_batch} images"
            raise MobileNetError(f"{what} takes batches of {size}")
        try:  # not muted: this runs for every batch, and the file has run once already
            return forward.execute([images.contiguous()])[0]
        except RuntimeError as e:  # e.g. "method->execute() failed" on a damaged program
            raise MobileNetError(f"{what}: ExecuTorch cannot run it ({first_line(e)})") from None

    return run, metadata


def probe_pte(data: bytes, what: str) -> None:
    """Load ``data`` and run it once (batch 1, zeros) on one thread: what the child
    process of :func:`mobilenet.native.verify_in_child` does with a ``.pte``."""
    set_pte_threads(1)
    run, metadata = read_pte(data, what, verify=False)
    resolution = ModelCard.read(metadata, what).resolution
    run(torch.zeros(1, 3, resolution, resolution))


def set_pte_threads(threads: int) -> None:
    """Set the threads of ExecuTorch's XNNPACK pool, process-wide. It starts with one per
    core, so a timing "on one thread" of a ``.pte`` is not one unless this is called. The
    only setter the Python runtime offers is marked unsafe, and is: a method loaded before
    the pool is replaced crashes the process when it next runs. So call this before
    loading a program; it does nothing when the pool already has ``threads`` threads."""
    _require()
    from executorch.extension.pybindings import portable_lib

    with quiet_native_stderr():  # the pool's creation logs its CPU probing
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)


def _require() -> None:
    """Import the runtime, or name the extra; its first import logs a deprecation warning
    of torchao's (a dependency) that says nothing to a user, so it is silenced."""
    pytree = logging.getLogger("torch.utils._pytree")
    level = pytree.level
    pytree.setLevel(logging.ERROR)
    try:
        require("executorch.runtime", "mobile", _PURPOSE)
    finally:
        pytree.setLevel(level)


def _metadata(
    model: nn.Module, resolution: int, extra: dict[str, str] | None, dtype: str, max_batch: int
) -> dict[str, str]:
    meta = {**model_metadata(model, resolution), **(extra or {})}
    return {**meta, "dtype": dtype, "max_batch": str(max_batch), "format": FORMAT}


def _check_max_batch(max_batch: int) -> None:
    """Refuse a batch bound no program may have, before any work."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int):
        raise MobileNetError(f"max_batch must be a whole number, not {max_batch!r}")
    if not 1 <= max_batch <= MAX_BATCH:
        raise MobileNetError(
            f"an ExecuTorch program takes batches of 1 to at most {MAX_BATCH} images "
            f"(its memory is planned for the largest), not {max_batch}"
        )


def _in_slices(run: Callable[[torch.Tensor], torch.Tensor], max_batch: int):
    """``run`` (a program's forward) on a batch of any size, in slices of ``max_batch``;
    each slice's logits copied, since the runtime may reuse its output buffer."""

    def sliced(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([run(part).clone() for part in images.split(max_batch)])

    return sliced


def _parse_metadata(text: Any, what: str) -> dict[str, str]:
    try:
        metadata = json.loads(text)
    except (TypeError, ValueError):
        metadata = None
    valid = isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    if not valid or metadata.get("format") != FORMAT:
        raise MobileNetError(f"{what}: not a .pte file written by mobilenet export")
    square = ModelCard.read(metadata, what).resolution  # the card's own checks, in one line
    if not metadata.get("max_batch", "").isdigit() or square is None:
        raise MobileNetError(f"{what}: its mobilenet metadata is damaged")
    return metadata


def _torch_export(
    module: nn.Module, resolution: int, name: str, max_batch: int = MAX_BATCH
) -> torch.export.ExportedProgram:
    """``module`` exported for batches of 1 to ``max_batch``: a static batch of 1, or a
    batch dimension (the graph then takes the batch as a symbol, so an example of 2)."""
    if max_batch == 1:
        example, dynamic = torch.randn(1, 3, resolution, resolution), None
    else:
        example = torch.randn(2, 3, resolution, resolution)  # batch 1 would be specialised
        dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with warnings.catch_warnings(), quiet_torch_export_logs():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise MobileNetError(f"torch.export cannot export {name}: {first_line(e)}") from None
    return unsqueeze_as_view(program)


def unsqueeze_as_view(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with every ``unsqueeze`` written as the ``view`` it is (to its static
    shape, ``-1`` for a batch of 1 to ``max_batch``), in place: XNNPACK lowers a view of
    any shape but an unsqueeze only of the last dimension, and each one it leaves (a
    Mobile MQA block's shared key and value head) splits the delegated graph in two."""
    graph = program.graph_module.graph
    for node in graph.nodes:
        if node.target is not torch.ops.aten.unsqueeze.default:
            continue
        sizes = [s if isinstance(s, int) else -1 for s in node.meta["val"].shape]
        if sizes.count(-1) <= 1:
            node.target, node.args = torch.ops.aten.view.default, (node.args[0], sizes)
    program.graph_module.recompile()
    return program


def _lower(program: torch.export.ExportedProgram, meta: dict[str, str], name: str) -> bytes:
    """The program lowered to XNNPACK and serialised, with ``meta`` as a constant method."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with warnings.catch_warnings(), quiet_torch_export_logs():
            warnings.simplefilter("ignore")
            edge = to_edge_transform_and_lower(
                program,
                partitioner=[XnnpackPartitioner()],
                constant_methods={META_METHOD: json.dumps(meta)},
            )
            return bytes(edge.to_executorch().buffer)
    except Exception as e:  # ExecuTorch raises many types for a graph it cannot lower
        raise MobileNetError(f"ExecuTorch cannot lower {name}: {first_line(e)}") from None


def _run(method: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> np.ndarray:
    return method(images).detach().numpy()


def _check_int8(method, model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """The int8 program checked against the quantized PyTorch reference it was lowered
    from, on calibration images, by :func:`mobilenet.export.int8_check.check_int8`: refused
    when it is further from the reference than ``INT8_SLACK`` times this network's own
    rounding noise, or picks a class the reference does not come close to; returns its max
    abs difference from the float model."""
    return check_int8(method, model, reference, images, "ExecuTorch", INT8_SLACK)
