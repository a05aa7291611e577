"""``mobilenet export``, ``quantize``, ``bench``: deployment and its engines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MobileNetError
from ..limits import check_memory, meta_model
from ..models import create_model, model_task
from .args import (
    add_model_args,
    model_kwargs,
    model_name,
    positive_float,
    positive_int,
    resolution_hw,
    width,
)
from .preprocess import PREPROCESS_FLAGS, add_preprocess_args, apply_preprocess, say_preprocess
from .quantize import QUANTIZE_SUFFIXES, cmd_quantize
from .train import checkpoint_task_of

__all__ = ["add_parsers"]

# export --format -> the file it writes; eval and predict tell the formats by the suffix
EXPORT_SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2", "pte": ".pte", "tflite": ".tflite"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export to ONNX or a torch.export program (.pt2), checked against PyTorch"
    )
    p.add_argument("--model", type=model_name(),
                   help="model name (default: the one --weights names)")  # fmt: skip
    add_model_args(p)
    p.add_argument("--weights", help="checkpoint (any format load_weights accepts)")
    p.add_argument(
        "--format",
        choices=["onnx", "pt2", "pte", "tflite", "torchscript"],
        default=None,
        help="default: from --out (.onnx, .pt2, .pte, .tflite), else onnx. pt2: "
        "torch.export program; pte: ExecuTorch program (XNNPACK, batch 1 to 8, "
        'pip install "mobilenet[mobile]"); tflite: LiteRT model (pip install '
        '"mobilenet[litert]"); torchscript: deprecated, use pt2',
    )
    p.add_argument("--out", required=True, help="output file")
    p.add_argument(
        "--resolution", type=resolution_hw, default=None, help="input size: N, or HxW (onnx)"
    )
    p.add_argument("--opset", type=opset, default=None, help="ONNX opset (default 17)")
    add_preprocess_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "quantize",
        help="int8 quantization: post-training or quantization-aware; PyTorch, ONNX or ExecuTorch",
        description="PTQ calibrates activation ranges on --calibration-images images; QAT "
        "fine-tunes with fake quantization for --epochs epochs (PyTorch format only). The "
        "format follows --out (.onnx: ONNX Runtime QDQ; .pte: ExecuTorch program for "
        "XNNPACK; .tflite: full-integer LiteRT model; otherwise PyTorch int8 safetensors). "
        "A flag the chosen method or format "
        "does not use is refused.",
    )
    p.add_argument("--model", type=model_name("classification"), help="for torchvision/timm")
    p.add_argument("--weights", required=True, help="trained weights (best.safetensors, ...)")
    p.add_argument("--data", required=True, help="calibration images: folder or mnist/digits")
    p.add_argument("--method", choices=["ptq", "qat"], default="ptq")
    p.add_argument("--format", choices=list(QUANTIZE_SUFFIXES), default=None,
                   help="default: from --out")  # fmt: skip
    p.add_argument("--calibration-images", type=positive_int, default=None, help="PTQ (512)")
    p.add_argument("--epochs", type=positive_int, default=None, help="QAT fine-tuning epochs (3)")
    p.add_argument("--lr", type=positive_float, default=None, help="QAT learning rate (1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="QAT batch size (64)")
    p.add_argument("--integer-only", action="store_true",
                   help="every operator in int8: pte, h-swish and h-sigmoid too; onnx, "
                   "MobileNetV3's stem and first block too (kept in float32 otherwise, "
                   "where they run faster)")  # fmt: skip
    p.add_argument("--out", required=True, help="output file (.safetensors, .onnx, .pte, .tflite)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("bench", help="time every inference engine on this machine")
    p.add_argument("model", type=model_name(("classification", "segmentation")), help="model")
    p.add_argument("--width-mult", type=width, default=1.0, help="width multiplier alpha")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--resolution", type=resolution_hw, default=224, help="N or HxW")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--engines", default=None, help="comma-separated (default: all)")
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds")
    p.add_argument("--iterations", type=positive_int, default=10, help="calls per round")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--save", action="store_true",
                   help="record the medians for predict --engine auto "
                   "($MOBILENET_HOME/engines.json)")  # fmt: skip
    p.set_defaults(func=cmd_bench)


def supported_opsets() -> range:
    """The ONNX opsets the installed exporter writes (``torch.onnx``'s TorchScript-based
    exporter, which :mod:`mobilenet.export` uses) and the installed ``onnx`` knows.

    7 is the oldest opset ONNX Runtime runs. The bounds live in a private module of
    ``torch.onnx``; where it has moved, the range the exporter has long supported is used.
    """
    low, high = 7, 17
    try:
        from torch.onnx import _constants

        low = max(low, getattr(_constants, "ONNX_MIN_OPSET", low))
        high = getattr(
            _constants,
            "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET",
            getattr(_constants, "ONNX_MAX_OPSET", high),
        )
    except ImportError:
        pass
    try:
        import onnx.defs

        high = min(high, onnx.defs.onnx_opset_version())
    except ImportError:  # export then names the missing extra itself
        pass
    return range(low, high + 1)


def opset(text: str) -> int:
    """An argument type: an ONNX opset the installed exporter supports."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    supported = supported_opsets()
    if value not in supported:
        raise argparse.ArgumentTypeError(
            f"opset {value} is not supported by the installed exporter: choose "
            f"{supported.start} to {supported.stop - 1}"
        )
    return value


def cmd_export(args: argparse.Namespace) -> int:
    from ..export.onnx import DEFAULT_OPSET, export_onnx, export_torchscript, input_size
    from ..export.pt2 import export_pt2

    args.format = _export_format(args)  # a contradicting suffix is refused below
    batch = "dynamic batch"
    if args.opset is not None and args.format != "onnx":
        raise MobileNetError(f"--opset applies to --format onnx, not {args.format}")
    if args.model is None and not args.weights:
        raise MobileNetError("give --model (a randomly initialised model) or --weights")
    if args.weights and Path(args.weights).suffix in EXPORT_SUFFIXES.values():
        raise MobileNetError(f"{args.weights} is already exported: export the float weights")
    task = checkpoint_task_of(args.weights, args.model) if args.weights else None
    task = task or model_task(args.model)
    _check_preprocess_flags(args, task)
    _check_export_suffix(args)
    if task == "detection":
        return _export_detector(args)
    if task == "segmentation" and args.format != "onnx":
        raise MobileNetError("segmentation models export to ONNX only (--format onnx)")
    if isinstance(args.resolution, tuple) and args.format != "onnx":
        raise MobileNetError(f"--resolution HxW applies to --format onnx; {args.format} takes N")
    if isinstance(args.resolution, tuple) and task == "classification":
        # eval, predict and the preprocessing a file keeps take a square's side
        raise MobileNetError(
            "a classifier's input is square: --resolution N (HxW applies to segmentation models)"
        )
    metadata: dict[str, str] = {}
    if args.weights and task == "segmentation":
        model, resolution, metadata = _load_segmenter_for_export(args)
    elif args.weights:
        model, resolution, metadata = _load_for_export(args)
    else:  # random initialisation: for checking a deployment path, not for use
        resolution = args.resolution or 224
        # Checked on the meta device, before a byte is allocated.
        check_memory(meta_model(args.model, **model_kwargs(args)), resolution, *_EXPORT_CHECK)
        model = create_model(args.model, **model_kwargs(args))
        if model_task(args.model) == "classification" and args.format != "torchscript":
            metadata = _preprocess_metadata(args, model, resolution)
    if args.format == "onnx":
        diff = export_onnx(model, args.out, resolution, args.opset or DEFAULT_OPSET, metadata)
        checked = "ONNX Runtime"
    elif args.format == "pt2":
        diff = export_pt2(model, args.out, resolution, metadata)
        checked = "torch.export"
    elif args.format == "pte":
        from ..export.executorch import MAX_BATCH, export_pte

        diff = export_pte(model, args.out, resolution, metadata)
        checked, batch = "ExecuTorch", f"batch 1 to {MAX_BATCH}"
    elif args.format == "tflite":
        from ..export.litert import export_tflite

        diff = export_tflite(model, args.out, resolution, metadata)
        checked, batch = "LiteRT", "batch 1, resizable"
    else:
        diff = export_torchscript(model, args.out, resolution)
        checked = "TorchScript"
    size = "x".join(map(str, input_size(resolution)))
    print(
        f"wrote {args.out}: {model.config.name} at {size}, {batch}; "
        f"{checked} vs PyTorch max abs difference {diff:.2e}"
    )
    if "preprocess" in metadata:  # after the write: a refused export stays one error line
        from ..data.preprocess import Preprocess

        say_preprocess(Preprocess.from_json(metadata["preprocess"], args.out))
    if args.format == "torchscript":
        # After the write, not before: a refused export stays one error line.
        print(
            "note: TorchScript is deprecated in PyTorch (torch.jit.load warns); "
            "use --format pt2 (torch.export), which eval and predict load",
            file=sys.stderr,
        )
    return 0


# The export runs the model on batches of 1 and 3 to check the exported file against it.
_EXPORT_CHECK = (3, "the export")


def _load_for_export(args: argparse.Namespace):
    """The trained model, its resolution and the metadata it keeps in the exported file
    (its class names): the width and classes are the file's own, as for ``eval``;
    ``--width-mult`` overrides the width only when given (a torchvision/timm file)."""
    from ..inference import load_trained
    from ..models.base import DeployedModel

    trained = load_trained(args.weights, args.model, args.width_mult, args.resolution)
    if isinstance(trained.model, DeployedModel):
        raise MobileNetError(f"{args.weights} is already exported: export the float weights")
    _check_num_classes(args, trained.model.num_classes)
    check_memory(trained.model, trained.resolution, *_EXPORT_CHECK)
    if args.format == "torchscript":  # the file keeps no metadata: no preprocessing to name
        return trained.model, trained.resolution, {}
    trained = apply_preprocess(args, trained, say=False)  # kept in the file, said after it
    metadata = {"classes": json.dumps(trained.classes), "preprocess": trained.preprocess.to_json()}
    return trained.model, trained.resolution, metadata


def _load_segmenter_for_export(args: argparse.Namespace):
    """A trained segmentation model, its input size (``--resolution``, else the one it
    was trained at) and the metadata its file keeps (its class names)."""
    from ..segmentation.predict import load_segmenter

    trained = load_segmenter(args.weights, args.model, args.width_mult)
    _check_num_classes(args, trained.model.num_classes)
    size = args.resolution or trained.size
    check_memory(trained.model, size, *_EXPORT_CHECK)
    return trained.model, size, {"classes": json.dumps(trained.classes)}


def _check_num_classes(args: argparse.Namespace, count: int) -> None:
    """``--num-classes`` with ``--weights`` may repeat the file's count, not change it."""
    if args.num_classes is not None and args.num_classes != count:
        raise MobileNetError(
            f"--num-classes {args.num_classes} contradicts {args.weights}, which holds "
            f"{count} classes"
        )


def _check_preprocess_flags(args: argparse.Namespace, task: str) -> None:
    """Refuse preprocessing flags where nothing would keep them."""
    given = [
        flag for dest, (_, flag) in PREPROCESS_FLAGS.items() if getattr(args, dest) is not None
    ]
    if not given:
        return
    if task != "classification":
        what = args.model or args.weights
        raise MobileNetError(
            f"{given[0]} applies to classification models; {what} is a {task} model"
        )
    if args.format == "torchscript":
        raise MobileNetError(f"{given[0]}: a TorchScript file keeps no metadata; use --format pt2")


def _preprocess_metadata(args: argparse.Namespace, model, resolution: int) -> dict[str, str]:
    """The preprocessing a randomly initialised classifier's file keeps: ours, or the
    command line's."""
    from ..data.published import model_preprocess
    from ..deployed import Trained

    trained = Trained(model, [], resolution, preprocess=model_preprocess(model, resolution))
    return {"preprocess": apply_preprocess(args, trained, say=False).preprocess.to_json()}


def _implied_format(out: str) -> str | None:
    suffix = Path(out).suffix
    return next((f for f, s in EXPORT_SUFFIXES.items() if s == suffix), None)


def _export_format(args: argparse.Namespace) -> str:
    """The format ``export`` writes: ``--format``, else the one the suffix of ``--out``
    names, else ONNX."""
    return args.format or _implied_format(args.out) or "onnx"


def _check_export_suffix(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` whose suffix names another format than the one written (eval
    and predict read a file by its suffix)."""
    if _implied_format(args.out) not in (None, args.format):
        raise MobileNetError(
            f"--format {args.format} writes a {EXPORT_SUFFIXES.get(args.format, '.pt')} "
            f"file, not {Path(args.out).name}"
        )


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import ENGINES, BenchConfig, check_engines, format_table, run_bench

    if args.save and isinstance(args.resolution, tuple):
        raise MobileNetError("--save records square sizes (what predict looks up): --resolution N")
    engines = args.engines.split(",") if args.engines else list(ENGINES)
    engines = [e.strip() for e in engines if e.strip()]
    square = not isinstance(args.resolution, tuple)
    requested = engines
    engines = check_engines(
        engines, args.model, args.width_mult, bool(args.engines), args.batch, square
    )
    left_out = [e for e in requested if e not in engines]
    if left_out:  # e.g. torchvision-eager for a model torchvision lacks (MobileNetV4)
        print(f"note: left out, not applicable here: {', '.join(left_out)}", file=sys.stderr)
    cfg = BenchConfig(
        args.model, args.width_mult, args.batch, args.resolution, args.threads, args.rounds,
        args.iterations,
    )  # fmt: skip
    if args.save:
        from ..engines import load_records

        load_records()  # a damaged record is refused before minutes of timing, not after
    result = run_bench(cfg, engines, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.save:
        from ..engines import save_measurements

        path = save_measurements(result)
        print(f"medians recorded in {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _export_detector(args: argparse.Namespace) -> int:
    """A detector's raw outputs and default boxes, as ONNX."""
    from ..detection.export import export_detector_onnx
    from ..export.onnx import DEFAULT_OPSET

    if args.format != "onnx":
        raise MobileNetError("detectors export to ONNX only (--format onnx)")
    if isinstance(args.resolution, tuple):
        raise MobileNetError("a detector's input is square: --resolution N")
    metadata = {}
    if args.weights:
        from ..detection.predict import load_detector

        trained = load_detector(args.weights, args.model, args.width_mult)
        _check_num_classes(args, trained.model.num_classes)
        size = trained.model.config.image_size  # its default boxes are laid out for it
        if args.resolution is not None and args.resolution != size:
            raise MobileNetError(f"{args.weights} holds a detector of {size}x{size} images, "
                                 f"not {args.resolution}")  # fmt: skip
        model = trained.model
        metadata["categories"] = json.dumps([c.name for c in trained.categories])
        check_memory(model, model.config.image_size, *_EXPORT_CHECK)
    else:  # random initialisation: for checking a deployment path, not for use
        kwargs = model_kwargs(args)
        if args.resolution is not None:
            kwargs["image_size"] = args.resolution
        meta = meta_model(args.model, **kwargs)
        check_memory(meta, meta.config.image_size, *_EXPORT_CHECK)
        model = create_model(args.model, **kwargs)
    diff = export_detector_onnx(model, args.out, args.opset or DEFAULT_OPSET, metadata)
    size = model.config.image_size
    print(
        f"wrote {args.out}: {model.config.name} at {size}x{size}, dynamic batch; outputs "
        f"logits, box_codes, default_boxes ({len(model.anchors())} boxes); ONNX Runtime vs "
        f"PyTorch max abs difference {diff:.2e}"
    )
    return 0
