"""OpenVINO IR (``.xml`` + ``.bin``): export, int8 by NNCF, read by OpenVINO's CPU plugin;
the ``openvino``, ``openvino-int8`` and ``openvino-bf16`` engines.

An IR is two files: the graph (``model.xml``) and its weights (``model.bin`` beside it,
with the same stem; the graph names no file, so the pair may be moved or renamed
together). The inference-prepared model (BatchNorm folded) is traced and converted by
``openvino.convert_model`` with a dynamic batch; its model card
(:meth:`~mobilenet.card.ModelCard.metadata`) is the ``mobilenet`` section of the
graph's ``rt_info``, with the format's own keys:

    format          "mobilenet-openvino": an IR of ours
    weights_sha256  the SHA-256 of the .bin
    digest          the seal of the pair (:mod:`mobilenet.integrity`): the SHA-256 of the
                    .xml's bytes followed by the .bin's, with this value as 64 zeros

Both digests are checked on the bytes, before OpenVINO reads either file, and the bytes
checked are the bytes OpenVINO reads (from memory, not the files again): a damaged
file, a truncated .bin or a .bin of another export is one line naming the file, never a
model that loads and scores otherwise. An .xml without the ``format`` key (a foreign IR)
is refused, as it keeps no card.

The digest is integrity, not authenticity: a pair sealed anew reaches OpenVINO, whose
reader checks the graph's structure and shapes, not every value its kernels are built
from. Of 800 changes of a small IR sealed anew and loaded one after another in one
process, 11 crashed it (SIGSEGV), none alone: graphs that OpenVINO accepts and runs (a
convolution's dilation of -1 or padding of 2**31 - 1, a shape constant that makes the
logits' batch differ from the images') wrote outside their buffers, and a later load
crashed. So an IR is read and run first in a child process (:func:`probe_ir`, through
:mod:`mobilenet.native`, once per file: the exports record the files they have just
run), where a crash takes only the child down and logits of the wrong shape are
refused; and the graph's input and output must take any batch (see
``docs/formats/openvino.md``).

Export and load pin the CPU plugin's precision to f32 (``INFERENCE_PRECISION_HINT``):
its default is bf16 wherever the CPU has it, which would run a float32 model in bf16.

int8 (:meth:`OpenVinoFormat.quantize`) is NNCF's post-training quantization of the float
IR (checked against PyTorch first), calibrated on the user's images: FakeQuantize
operations with int8 weights per output channel, which the CPU plugin lowers to int8
kernels. Its reference, for the project's int8 rule
(:func:`~mobilenet.export.int8_check.check_int8`), is the same quantized graph with
every FakeQuantize computed by its definition in float32 (:func:`fake_quantized`): the
int8 kernels are held to what the quantization means, by this network's own rounding
noise, before a byte is written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..card import ModelCard
from ..deployed import Trained, check_images, checked_classes, exported_card
from ..errors import CheckpointError, MobileNetError
from ..extras import available, require
from ..fileio import atomic_write, read_bytes, write_bytes
from ..integrity import DIGEST_KEY, check_seal, seal, sealed_metadata
from ..models import ModelConfig
from ..models.base import DeployedModel
from ..native import NativeRuntime, record_verified, register_runtime, verify_in_child
from . import (
    BenchCase,
    BenchSetup,
    Engine,
    Exported,
    Format,
    LoadRequest,
    QuantizeRequest,
    square_classifiers_only,
)

__all__ = [
    "FORMAT",
    "FORMAT_MARK",
    "SECTION",
    "OpenVinoFormat",
    "OpenVinoModel",
    "fake_quantized",
    "has_bf16",
    "ir_bytes",
    "probe_ir",
    "weights_path",
]

FORMAT_MARK = "mobilenet-openvino"  # rt_info "format": an IR written by this module
SECTION = "mobilenet"  # the rt_info section that holds the card
WEIGHTS_KEY = "weights_sha256"
DEVICE = "CPU"
PRESET = "performance"  # NNCF's default for CNNs: symmetric activations (see quantize)

_EXPORT = "OpenVINO export (.xml)"
_RUN = "running an OpenVINO model (.xml)"
_QUANTIZE = "OpenVINO int8 quantization (NNCF)"


# Read in a child process first (see probe_ir), as ExecuTorch and LiteRT files are.
register_runtime(
    "openvino",
    NativeRuntime("OpenVINO", "openvino", "openvino", "mobilenet.formats.openvino:probe_ir"),
)


def weights_path(path: str | Path) -> Path:
    """The ``.bin`` of the IR whose graph is ``path``: beside it, with the same stem."""
    return Path(path).with_suffix(".bin")


# --------------------------------------------------------------------------- the model


class OpenVinoModel(DeployedModel):
    """A compiled OpenVINO model behind the ``nn.Module`` call interface (any batch)."""

    engine = "openvino"  # "openvino-int8" for an int8 IR

    def __init__(
        self, compiled, config: ModelConfig, resolution: int, engine: str, what: str
    ) -> None:
        super().__init__(config)
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.resolution = resolution
        self.engine = engine
        self.what = what  # the file, for messages

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.resolution)
        images = x.detach().cpu().float().contiguous().numpy()
        try:
            self.request.infer({0: images})
        except Exception as e:  # OpenVINO raises RuntimeError with its own text
            raise MobileNetError(f"{self.what}: OpenVINO fails to run it ({_first(e)})") from None
        # Copied: the request reuses its output buffer on the next call.
        logits = torch.from_numpy(self.request.get_output_tensor(0).data.copy())
        if tuple(logits.shape) != (x.shape[0], self.num_classes):
            raise MobileNetError(
                f"{self.what}: OpenVINO gives logits of shape {tuple(logits.shape)} for a "
                f"batch of {x.shape[0]}, not ({x.shape[0]}, {self.num_classes})"
            )
        return logits.to(x.device)


# --------------------------------------------------------------------------- the format


class OpenVinoFormat(Format):
    name = "openvino"
    rank = 50
    suffix = ".xml"
    extra = "openvino"
    modules = ("openvino",)
    summary = 'OpenVINO IR, .xml + .bin (dynamic batch; pip install "mobilenet[openvino]")'
    quantizes = True

    def export(
        self, model: nn.Module, path: Path, resolution: Any, card: ModelCard, **options: Any
    ) -> Exported:
        """Write ``model`` as an IR (``path``, and its ``.bin``) with ``card`` in its
        ``rt_info``, checked against PyTorch at batch 1 and 3 before either file is in
        place."""
        from ..export.check import check_against_pytorch

        self.require(_EXPORT)
        path = _xml_path(path)
        task = getattr(model, "task", "classification")
        if task not in self.tasks:
            raise MobileNetError(f"OpenVINO export takes classifiers, not {task} models")
        model = model.eval()
        graph = _convert(model, resolution)
        metadata = {**card.metadata(), "format": FORMAT_MARK}
        xml, weights = _serialize(graph, metadata)
        run = _verified(xml, weights, metadata, "the exported model")
        diff = check_against_pytorch(lambda t: run(t).numpy(), model, resolution, "OpenVINO")
        _write_pair(path, xml, weights)
        record_verified(ir_bytes(xml, weights), "openvino")  # read and run above
        return Exported(diff, "OpenVINO", "dynamic batch")

    def quantize(self, trained: Trained, request: QuantizeRequest) -> str:
        """An int8 IR of ``trained`` by NNCF, calibrated on ``request.images`` images of
        ``request.data`` (all it holds when fewer); checked by the project's int8 rule
        against the quantized graph computed in float32 before it is written."""
        from ..export.calibration import calibration_count, calibration_dataset
        from ..export.check import check_against_pytorch
        from ..export.int8_check import check_int8

        self.require(_QUANTIZE)
        with _quiet():  # importing it imports PyTorch modules that log a note
            require("nncf", self.extra or "all", _QUANTIZE)
        out = _xml_path(request.out)
        if isinstance(trained.model, DeployedModel):
            raise MobileNetError("OpenVINO int8 quantizes float PyTorch weights")
        dataset = calibration_dataset(trained, request.data)  # a bad --data before the work
        used = calibration_count(dataset, request.images, request.data, request.progress)
        model = trained.model.eval()
        threads = torch.get_num_threads()
        graph = _convert(model, trained.resolution)
        # The float IR first: the int8 rule measures from it, so it must be PyTorch's model.
        float_run = _runner(_compile(graph, threads, "f32", "the float model"))
        check_against_pytorch(lambda t: float_run(t).numpy(), model, trained.resolution, "OpenVINO")
        images = _CalibrationImages(dataset, used)
        quantized = _nncf_int8(graph, images, used)
        scheme = {"method": "ptq", "scheme": f"nncf-{PRESET}", "calibration_images": used}
        card = trained.model_card().replace(precision="int8", quantization=scheme)
        metadata = {**card.metadata(), "format": FORMAT_MARK}
        xml, weights = _serialize(quantized, metadata)
        run = _verified(xml, weights, metadata, "the int8 model")
        reference = _compile(fake_quantized(quantized), threads, "f32", "the int8 reference")
        first = torch.from_numpy(np.concatenate(list(images.first(3))))
        diff = check_int8(
            run,
            model,
            _runner(reference),
            first,
            "OpenVINO",
            reference_name="its FakeQuantize graph computed in float32",
        )
        _write_pair(out, xml, weights)
        record_verified(ir_bytes(xml, weights), "openvino")  # read and run above
        return (
            f"OpenVINO IR (weights in {weights_path(out).name}) by NNCF ({PRESET} preset), "
            f"calibrated on {used} images of "
            f"{request.data}; max abs difference from the float model {diff:.2e}"
        )

    def load(self, path: Path, request: LoadRequest) -> Trained:
        """A classifier's IR on the CPU plugin (float32 pinned, as many threads as
        PyTorch here): its digests checked before OpenVINO reads it, then read and run
        once in a child process (once per file), its card held to the graph and the
        command line."""
        path = Path(path)
        xml, weights = _checked_files(path)
        trained, _ = _open(xml, weights, path, request, torch.get_num_threads())
        return trained

    def metadata(self, path: Path) -> dict[str, str]:
        """The card's key/values (and the format's own) of an IR of ours, read by
        OpenVINO after the checks of :meth:`load`, without compiling it."""
        path = Path(path)
        xml, weights = _checked_files(path)
        _, metadata = _read_graph(xml, weights, path)
        return metadata

    def engines(self) -> tuple[Engine, ...]:
        common = {"modules": self.modules, "extra": self.extra, "format": self.name}
        return (
            Engine(
                "openvino",
                lambda s: _bench(s, "f32"),
                predicts=True,
                refuses=square_classifiers_only("openvino"),
                **common,
            ),
            Engine(
                "openvino-int8",
                _bench_int8,
                precision="int8",
                modules=(*self.modules, "nncf"),
                extra=self.extra,
                format=self.name,
                refuses=square_classifiers_only("openvino-int8"),
            ),
            Engine(
                "openvino-bf16",
                lambda s: _bench(s, "bf16"),
                precision="bf16",
                refuses=_bf16_refuses,
                **common,
            ),
        )


FORMAT = OpenVinoFormat()


# --------------------------------------------------------------------------- writing


def _xml_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".xml":
        raise MobileNetError(
            f"an OpenVINO IR is written as NAME.xml (its weights beside it, NAME.bin), "
            f"not {path.name}"
        )
    return path


def _convert(model: nn.Module, resolution: Any):
    """``model`` (BatchNorm folded) as an OpenVINO model taking ``(batch, 3, H, W)``
    images (``images``, any batch) and giving ``logits``. Traced once without the trace's
    own re-run check: the export checks the result against PyTorch at two batch sizes."""
    from ..export.metadata import input_size, model_name
    from ..export.prepare import prepare_for_inference

    ov = require("openvino", "openvino", _EXPORT)
    height, width = input_size(resolution)
    prepared = prepare_for_inference(model, channels_last=False)
    example = torch.zeros(1, 3, height, width)
    try:
        with _quiet(), torch.no_grad():  # torch.jit.trace's deprecation, the tracer's notes
            traced = torch.jit.trace(prepared, example, check_trace=False, strict=False)
            graph = ov.convert_model(traced, example_input=example)
    except Exception as e:  # an operation the tracer or OpenVINO's converter refuses
        name = model_name(model)
        raise MobileNetError(f"OpenVINO cannot convert {name} ({_first(e)})") from None
    graph.reshape([-1, 3, height, width])
    graph.inputs[0].get_tensor().set_names({"images"})
    graph.outputs[0].get_tensor().set_names({"logits"})
    return graph


def _serialize(graph, metadata: dict[str, str]) -> tuple[bytes, bytes]:
    """The IR's two files as bytes: ``metadata`` in the ``rt_info``, sealed (see the
    module's docstring). Weights are kept in float32 (OpenVINO's writer would halve them
    to float16 by default)."""
    ov = require("openvino", "openvino", _EXPORT)
    graph = graph.clone()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            xml_file = Path(tmp) / "model.xml"
            ov.save_model(graph, xml_file, compress_to_fp16=False)  # the .bin alone, first
            weights = weights_path(xml_file).read_bytes()
            digest = hashlib.sha256(weights).hexdigest()
            for key, value in sealed_metadata({**metadata, WEIGHTS_KEY: digest}).items():
                graph.set_rt_info(value, [SECTION, key])
            ov.save_model(graph, xml_file, compress_to_fp16=False)
            xml = xml_file.read_bytes()
            if weights_path(xml_file).read_bytes() != weights:
                raise RuntimeError("it wrote other weights for the same model")
    except Exception as e:  # a full temporary folder; OpenVINO's own errors
        raise MobileNetError(f"OpenVINO cannot serialize the IR ({_first(e)})") from None
    sealed = seal(xml + weights)  # the placeholder is in the .xml: the .bin follows as is
    return sealed[: len(xml)], weights


def _write_pair(path: Path, xml: bytes, weights: bytes) -> None:
    """Both files through temporary names: the ``.bin`` is renamed into place inside
    the ``.xml``'s write, the ``.xml`` last, so a reader never finds a new ``.xml``
    without its weights; on a failure neither new file is left."""
    bin_path = weights_path(path)
    placed: list[Path] = []

    def write(tmp: Path) -> None:
        tmp.write_bytes(xml)
        write_bytes(bin_path, weights)
        placed.append(bin_path)

    try:
        atomic_write(path, write)
    except BaseException:
        for written in placed:  # the .xml's rename failed after the .bin's
            with contextlib.suppress(OSError):
                written.unlink()
        raise


# --------------------------------------------------------------------------- reading


def _checked_files(path: Path) -> tuple[bytes, bytes]:
    """The bytes of an IR's two files, refused in one line before OpenVINO reads them in
    this process: not ours, the .bin missing, a digest that does not match; then read
    and run in a child process (once per file, see :func:`probe_ir`)."""
    require("openvino", "openvino", _RUN)
    xml = read_bytes(path, str(path))
    if FORMAT_MARK.encode() not in xml:  # before anything else: no card to go by
        raise CheckpointError(
            f"{path}: not an OpenVINO IR written by mobilenet export/quantize "
            f"(its rt_info holds no '{SECTION}' model card)"
        )
    bin_path = weights_path(path)
    if not bin_path.is_file():
        raise CheckpointError(
            f"{path}: its weights file {bin_path.name} is missing (an OpenVINO IR is "
            "the .xml and the .bin beside it)"
        )
    weights = read_bytes(bin_path, str(bin_path))
    _check_digests(xml, weights, path)
    verify_in_child(ir_bytes(xml, weights), str(path), "openvino")
    return xml, weights


def _check_digests(xml: bytes, weights: bytes, path: Path) -> None:
    """Both files as they were written together, checked on their bytes alone."""
    digest = hashlib.sha256(weights).hexdigest()
    if f'"{digest}"'.encode() not in xml:  # a value of the .xml's rt_info
        raise CheckpointError(
            f"{weights_path(path)}: damaged, or not the weights of {path.name}: its SHA-256 "
            f"({digest[:12]}...) is not the one {path.name} was written with"
        )
    if not check_seal(xml + weights, str(path), note=False):
        raise CheckpointError(f"{path}: damaged (its digest is missing)")


def _read_graph(xml: bytes, weights: bytes, path: Path) -> tuple[Any, dict[str, str]]:
    """The graph OpenVINO reads from these bytes (whose digests the caller has checked,
    or made) and the key/values of its ``mobilenet`` rt_info section."""
    ov = require("openvino", "openvino", _RUN)
    try:
        # A copy of the weights: the graph's constants must not outlive their buffer.
        graph = _core().read_model(xml, ov.Tensor(np.frombuffer(weights, np.uint8).copy()))
    except Exception as e:  # OpenVINO raises RuntimeError with its own text
        raise CheckpointError(f"{path}: not a model OpenVINO can read ({_first(e)})") from None
    metadata = _rt_metadata(graph, path)
    if metadata.get("format") != FORMAT_MARK:
        raise CheckpointError(
            f"{path}: not an OpenVINO IR written by mobilenet export/quantize "
            f"(rt_info '{SECTION}' says format {metadata.get('format', 'none')!r})"
        )
    return graph, metadata


def _open(
    xml: bytes, weights: bytes, path: Path, request: LoadRequest, threads: int
) -> tuple[Trained, dict[str, str]]:
    """The runnable classifier an IR of ours holds, and its card's key/values: the card
    held to the graph (input and output shapes, class count, precision) and to
    ``request``."""
    graph, metadata = _read_graph(xml, weights, path)
    card, config, res = exported_card(
        metadata, path, request.model, request.width_mult, request.resolution
    )
    outputs = _checked_shapes(graph, path, res)
    classes = checked_classes(card, path, config.num_classes, outputs)
    quantized = any(op.get_type_name() == "FakeQuantize" for op in graph.get_ops())
    if quantized != (card.precision == "int8"):
        holds = "FakeQuantize operations" if quantized else "no FakeQuantize operation"
        raise CheckpointError(
            f"{path}: metadata 'precision' says {card.precision}; the graph holds {holds}"
        )
    compiled = _compile(graph, threads, "f32", str(path))
    engine = "openvino-int8" if quantized else "openvino"
    model = OpenVinoModel(compiled, config, res, engine, str(path))
    return Trained(model, classes, res, path, card.preprocess, card), metadata


def ir_bytes(xml: bytes, weights: bytes) -> bytes:
    """An IR's two files as the one string of bytes a child process reads and its
    verdict is kept by (:func:`mobilenet.native.verify_in_child`): the .xml's length,
    the .xml, the .bin."""
    return len(xml).to_bytes(8, "little") + xml + weights


def probe_ir(data: bytes, what: str) -> None:
    """Read an IR (as :func:`_pack` gives it) and run it once at batch 1 and 3, on one
    thread: what a child process does before this process reads a file
    (:mod:`mobilenet.native`). Crafted graphs that OpenVINO's reader accepts can corrupt
    the memory of the process that runs them (a convolution's strides, dilations or
    pads out of range; logits for another batch than the images'): in the child, a
    wrong output is refused and a crash takes only the child down."""
    size = int.from_bytes(data[:8], "little")
    xml, weights = data[8 : 8 + size], data[8 + size :]
    trained, _ = _open(xml, weights, Path(what), LoadRequest(), threads=1)
    for batch in (1, 3):
        trained.model(torch.zeros(batch, 3, trained.resolution, trained.resolution))


def _rt_metadata(graph, path: Path | str) -> dict[str, str]:
    """The ``mobilenet`` section of a graph's ``rt_info`` as string key/values."""
    rt_info = graph.get_rt_info()
    if SECTION not in list(rt_info.keys()):
        raise CheckpointError(f"{path}: its rt_info holds no '{SECTION}' model card")
    section = rt_info[SECTION]
    if not isinstance(section, dict):
        raise CheckpointError(f"{path}: rt_info '{SECTION}' is not a table of key/values")
    metadata = {}
    for key, value in section.items():
        if isinstance(value, dict):
            raise CheckpointError(f"{path}: rt_info '{SECTION}' key {key!r} is not text")
        metadata[str(key)] = value.astype(str)
    return metadata


def _verified(
    xml: bytes, weights: bytes, metadata: dict[str, str], what: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """An IR this process has just made (with ``metadata``), read back as a file of it
    would be (digests, card, shapes), as a runner of the loaded model."""
    trained, read = _open(xml, weights, Path(what), LoadRequest(), torch.get_num_threads())
    # XML keeps attribute values as text, but a control character would come back
    # changed (a line break as a space): the card must read back as it was written.
    keys = (set(metadata) | set(read)) - {DIGEST_KEY, WEIGHTS_KEY}
    changed = sorted(k for k in keys if read.get(k) != metadata.get(k))
    if changed:
        raise MobileNetError(
            f"the model card does not survive OpenVINO's rt_info (changed: "
            f"{', '.join(changed)}); nothing written"
        )
    model = trained.model
    return lambda x: model(x).detach()


def _checked_shapes(graph, path: Path, res: int) -> int:
    """The number of logits the graph gives, its input and output held to the card's
    input size and a classifier's ``(batch, logits)``."""
    ov = require("openvino", "openvino", _RUN)
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise CheckpointError(
            f"{path}: the graph has {len(graph.inputs)} inputs and {len(graph.outputs)} "
            "outputs, not one image batch in and its logits out"
        )
    source, result = graph.inputs[0], graph.outputs[0]
    shape_in = source.get_partial_shape()
    dims = _dims(shape_in)
    if dims is None or len(dims) != 4 or dims[0] is not None or dims[1:] != [3, res, res]:
        raise CheckpointError(
            f"{path}: metadata says {res}x{res} images; the graph takes {shape_in} "
            f"(not [?,3,{res},{res}])"
        )
    shape_out = result.get_partial_shape()
    dims = _dims(shape_out)
    if dims is None or len(dims) != 2 or dims[0] is not None or dims[1] is None:
        raise CheckpointError(
            f"{path}: the graph's output {shape_out} is not (batch, logits) for any batch"
        )
    for port, which in ((source, "input"), (result, "output")):
        if port.get_element_type() != ov.Type.f32:
            raise CheckpointError(
                f"{path}: the graph's {which} is {port.get_element_type()}, not f32"
            )
    return dims[1]


def _dims(shape) -> list[int | None] | None:
    """A partial shape's dimensions (None for a dynamic one); None for a dynamic rank."""
    if shape.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else None for d in shape]


@functools.cache
def _core():
    """One OpenVINO core per process: it loads the CPU plugin once."""
    return require("openvino", "openvino", _RUN).Core()


def _config(threads: int, precision: str) -> dict[str, object]:
    """The CPU plugin's settings: one stream on ``threads`` threads, the inference
    precision pinned (the plugin's default is bf16 wherever the CPU has it)."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": precision,
    }


def _compile(graph, threads: int, precision: str, what: str):
    try:
        return _core().compile_model(graph, DEVICE, _config(threads, precision))
    except Exception as e:  # OpenVINO raises RuntimeError with its own text
        raise CheckpointError(f"{what}: OpenVINO cannot compile it ({_first(e)})") from None


def _runner(compiled) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch of images in, float logits out (a copy: the request reuses its buffer)."""
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def _first(e: BaseException) -> str:
    """The first line of an exception's text that says something (OpenVINO's start with
    the source file that raised them)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith("Exception from ")]
    return (said or lines or [type(e).__name__])[0][:300]


# --------------------------------------------------------------------------- int8


class _CalibrationImages:
    """The calibration images one at a time, as NNCF takes them, in the same random
    order on every pass (NNCF may iterate more than once)."""

    def __init__(self, dataset, count: int, seed: int = 0) -> None:
        self.dataset, self.count, self.seed = dataset, count, seed

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[np.ndarray]:
        from ..export.calibration import calibration_batches

        generator = torch.Generator().manual_seed(self.seed)
        for batch in calibration_batches(self.dataset, self.count, generator):
            for image in batch:
                yield image[None].numpy()

    def first(self, count: int) -> Iterator[np.ndarray]:
        for index, image in enumerate(self):
            if index == count:
                return
            yield image


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF's progress bars (to stdout) and log lines, and the notes of the PyTorch
    modules it imports (``convert_model`` imports ``nncf.torch`` where NNCF is imported),
    kept off the terminal: an export or a quantization is one line when it ends."""
    loggers = [logging.getLogger(name) for name in ("nncf", "torch.utils.cpp_extension")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _nncf_int8(graph, images: Iterable[np.ndarray], count: int, bias_correction: bool = True):
    """NNCF's post-training int8 of an OpenVINO model, calibrated on ``count`` images
    (``bias_correction`` False: ranges only, the same graph for timing, in a quarter
    less time)."""
    nncf = require("nncf", "openvino", _QUANTIZE)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    advanced = AdvancedQuantizationParameters(disable_bias_correction=not bias_correction)
    with _quiet():
        try:
            return nncf.quantize(
                graph,
                nncf.Dataset(images),
                preset=nncf.QuantizationPreset(PRESET),
                subset_size=count,
                advanced_parameters=advanced,
            )
        except MobileNetError:  # a calibration image that cannot be read
            raise
        except Exception as e:  # NNCF's own error types
            raise MobileNetError(f"NNCF cannot quantize the model ({_first(e)})") from None


def fake_quantized(graph):
    """A copy of a quantized OpenVINO model with every FakeQuantize computed by its
    definition in float32 (OpenVINO's operation specification):

        x <= min(in_low, in_high): out_low;  x > max(in_low, in_high): out_high;
        else: round((x - in_low) / (in_high - in_low) * (levels - 1))
              / (levels - 1) * (out_high - out_low) + out_low

    The CPU plugin runs these as float operations: the quantization's meaning without
    the int8 kernels' requantization, which :func:`check_int8` holds the int8 model to."""
    ov = require("openvino", "openvino", _QUANTIZE)
    ops = ov.opset13
    model = graph.clone()
    for fq in [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]:
        x, in_low, in_high, out_low, out_high = (fq.input_value(i) for i in range(5))
        steps = np.float32(fq.get_attributes()["levels"] - 1)
        low, high = ops.minimum(in_low, in_high), ops.maximum(in_low, in_high)
        span = ops.maximum(ops.subtract(in_high, in_low), np.float32(np.finfo(np.float32).tiny))
        inside = ops.subtract(ops.minimum(ops.maximum(x, low), high), in_low)
        level = ops.round(ops.multiply(ops.divide(inside, span), steps), "half_to_even")
        scale = ops.divide(ops.subtract(out_high, out_low), steps)
        value = ops.add(ops.multiply(level, scale), out_low)
        value = ops.select(ops.greater(x, high), out_high, value)
        value = ops.select(ops.less_equal(x, low), out_low, value)
        fq.output(0).replace(value.output(0))
    model.validate_nodes_and_infer_types()
    return model


# --------------------------------------------------------------------------- engines


def has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (its OPTIMIZATION_CAPABILITIES)."""
    return "BF16" in _capabilities()


@functools.cache
def _capabilities() -> tuple[str, ...]:
    if not available("openvino"):
        return ()
    return tuple(_core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))


def _bf16_refuses(case: BenchCase) -> str | None:
    if available("openvino") and not has_bf16():
        found = ", ".join(_capabilities()) or "none"
        return f"openvino-bf16 needs a CPU with bf16 (OpenVINO's CPU plugin here: {found})"
    return square_classifiers_only("openvino-bf16")(case)


def _bench(setup: BenchSetup, precision: str) -> Callable[[], object]:
    graph = _convert(setup.model, setup.resolution)
    return _bench_run(_compile(graph, setup.threads, precision, "the model"), setup)


def _bench_int8(setup: BenchSetup) -> Callable[[], object]:
    """NNCF's int8 of the model, calibrated on the setup's images (random ones without)."""
    graph = _convert(setup.model, setup.resolution)
    if setup.calibration is not None:
        images = [image[None].numpy() for batch in setup.calibration() for image in batch]
    else:
        generator = torch.Generator().manual_seed(0)
        shape = (1, *setup.images.shape[1:])
        images = [torch.randn(shape, generator=generator).numpy() for _ in range(8)]
    quantized = _nncf_int8(graph, images, len(images), bias_correction=False)
    return _bench_run(_compile(quantized, setup.threads, "f32", "the int8 model"), setup)


def _bench_run(compiled, setup: BenchSetup) -> Callable[[], object]:
    request = compiled.create_infer_request()
    images = setup.images.numpy()
    return lambda: request.infer({0: images})
