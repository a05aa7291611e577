"""``mobilenet export``, ``quantize``, ``bench``: deployment and its engines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import MobileNetError
from ..export.onnx import DEFAULT_OPSET
from ..formats import Format, format_named, format_of, formats
from ..models import model_task
from .args import (
    add_model_args,
    model_name,
    positive_float,
    positive_int,
    resolution_hw,
    width,
)
from .preprocess import PREPROCESS_FLAGS, add_preprocess_args
from .quantize import cmd_quantize, quantize_formats
from .tasks import flag_owners, task_named, tasks
from .train import checkpoint_task_of

__all__ = ["add_parsers"]


def export_formats() -> dict[str, Format]:
    """The formats ``export`` writes, by name."""
    return {name: f for name, f in formats().items() if f.exports}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_export_parser(sub)
    add_quantize_parser(sub)
    _add_bench_parser(sub)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    written = export_formats()
    p = sub.add_parser(
        "export",
        help=f"export to {_either(written)}, checked against PyTorch",
        description="Write --weights (or a randomly initialised --model, to check a "
        f"deployment path) in one of the formats {_either(written)}: --format, else the "
        "one the suffix of --out names, else onnx. The file is run and compared with "
        f"PyTorch before it is put in place. {_export_tasks(written)}.",
    )
    p.add_argument(
        "--model", type=model_name(), help="model name (default: the one --weights names)"
    )
    add_model_args(p)
    p.add_argument("--weights", help="checkpoint (any format load_weights accepts)")
    named = sorted({f.suffix for f in written.values() if f.names_files})
    p.add_argument(
        "--format",
        choices=list(written),
        default=None,
        help=f"default: from --out ({', '.join(named)}), else onnx. "
        + "; ".join(f"{name}: {f.summary}" for name, f in written.items()),
    )
    p.add_argument("--out", required=True, help="output file")
    p.add_argument(
        "--resolution",
        type=resolution_hw,
        default=None,
        help=f"input size: N, or HxW ({_either(_rectangular(written))})",
    )
    p.add_argument(
        "--opset",
        type=opset,
        default=None,
        help=f"{_either(_taking(written, 'opset'))}: the opset (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--max-batch",
        type=max_batch,
        default=None,
        help=f"{_either(_taking(written, 'max_batch'))}: the largest batch the program "
        "takes, 1 to 8 (default 1, as ExecuTorch's recipe: a range makes XNNPACK run the "
        "classifier apart and plans memory for it)",
    )
    add_preprocess_args(p)
    p.set_defaults(func=cmd_export)


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from ..formats import engines

    p = sub.add_parser(
        "bench",
        help="time every inference engine on this machine",
        description="Time a model with random weights on each engine, in interleaved "
        "rounds. The engines, by the format they run: "
        + "; ".join(_engines_by_format(engines()))
        + ".",
    )
    p.add_argument("model", type=model_name(("classification", "segmentation")), help="model")
    p.add_argument("--width-mult", type=width, default=1.0, help="width multiplier alpha")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--resolution", type=resolution_hw, default=224, help="N or HxW")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument(
        "--engines",
        default=None,
        help="comma-separated engines, listed above (default: all)",
    )
    p.add_argument("--rounds", type=positive_int, default=7, help="interleaved rounds")
    p.add_argument("--iterations", type=positive_int, default=10, help="calls per round")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--save",
        action="store_true",
        help="record the medians for predict --engine auto ($MOBILENET_HOME/engines.json)",
    )
    p.set_defaults(func=cmd_bench)


def _either(names) -> str:
    """``a, b or c``: names (or a registry's keys) in words, for a help text."""
    names = list(names)
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _taking(written: dict[str, Format], option: str) -> list[str]:
    """The formats whose export takes ``option`` (a dest: ``opset``, ``max_batch``)."""
    return [name for name, f in written.items() if option in f.options]


def _rectangular(written: dict[str, Format]) -> list[str]:
    """The formats that take an HxW input: those of a task whose input may be HxW."""
    wide = {name for name, commands in tasks().items() if commands.square_input is None}
    return [name for name, f in written.items() if wide & set(f.tasks)]


def _export_tasks(written: dict[str, Format]) -> str:
    """Which task's models export to which formats, in words."""
    by_task = {task: [n for n, f in written.items() if task in f.tasks] for task in tasks()}
    parts = [f"{task} to {_either(names)}" for task, names in by_task.items() if names]
    return "Models export by task: " + "; ".join(parts)


def _engines_by_format(found: dict) -> list[str]:
    """``format: engine, engine`` for each format with engines (PyTorch's in process)."""
    grouped: dict[str, list[str]] = {}
    for name, engine in found.items():
        grouped.setdefault(engine.format or "PyTorch in process", []).append(name)
    return [f"{fmt}: {', '.join(names)}" for fmt, names in grouped.items()]


def add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="int8 quantization, post-training or quantization-aware: "
        + ", ".join(f"{name} ({f.suffix})" for name, f in quantize_formats().items()),
        description="PTQ calibrates activation ranges on --calibration-images images; QAT "
        "fine-tunes with fake quantization for --epochs epochs, a training run in its own "
        "folder (--run; --resume continues it), the best int8 epoch written to --out "
        "(PyTorch format only). --format, else the suffix of --out, picks the format: "
        + "; ".join(f"{f.suffix} {f.summary}" for f in quantize_formats().values())
        + ". A flag the chosen method or format does not use is refused.",
    )
    p.add_argument("--model", type=model_name("classification"), help="for torchvision/timm")
    p.add_argument("--weights", required=True, help="trained weights (best.safetensors, ...)")
    p.add_argument("--data", required=True, help="calibration images: folder or mnist/digits")
    p.add_argument("--method", choices=["ptq", "qat"], default="ptq")
    p.add_argument(
        "--format", choices=list(quantize_formats()), default=None, help="default: from --out"
    )
    p.add_argument("--calibration-images", type=positive_int, default=None, help="PTQ (512)")
    p.add_argument("--epochs", type=positive_int, default=None, help="QAT fine-tuning epochs (3)")
    p.add_argument("--lr", type=positive_float, default=None, help="QAT learning rate (1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="QAT batch size (64)")
    p.add_argument(
        "--run",
        default=None,
        help="QAT: the training run's folder (metrics.csv, last.pt, best.safetensors; "
        "default: --out without its suffix, plus .qat)",
    )
    p.add_argument(
        "--resume", action="store_true", default=None, help="QAT: continue the run in --run"
    )
    p.add_argument("--ema-decay", type=positive_float, default=None, help="QAT: keep an EMA")
    p.add_argument(
        "--integer-only",
        action="store_true",
        help="every operator in int8: pte, h-swish and h-sigmoid too; onnx, MobileNetV3's "
        "stem and first block too (kept in float32 otherwise, where they run faster)",
    )
    suffixes = sorted({f.suffix for f in quantize_formats().values()})
    p.add_argument("--out", required=True, help=f"output file ({', '.join(suffixes)})")
    p.set_defaults(func=cmd_quantize)


def max_batch(text: str) -> int:
    """An argument type: a batch bound an ExecuTorch program can be planned for."""
    from ..export.executorch import MAX_BATCH

    value = positive_int(text)
    if value > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"at most {MAX_BATCH}, not {value}")
    return value


def opset(text: str) -> int:
    """An argument type: an ONNX opset the installed exporter supports."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    from ..export.onnx import supported_opsets

    supported = supported_opsets()
    if value not in supported:
        raise argparse.ArgumentTypeError(
            f"opset {value} is not supported by the installed exporter: choose "
            f"{supported.start} to {supported.stop - 1}"
        )
    return value


def cmd_export(args: argparse.Namespace) -> int:
    name = _export_format(args)
    fmt = format_named(name)  # a contradicting suffix is refused below
    args.format = fmt.name
    for dest, flag in (("opset", "--opset"), ("max_batch", "--max-batch")):
        if getattr(args, dest) is not None and dest not in fmt.options:
            takes = [f.name for f in export_formats().values() if dest in f.options]
            raise MobileNetError(f"{flag} applies to --format {' or '.join(takes)}, not {fmt.name}")
    if args.model is None and not args.weights:
        raise MobileNetError("give --model (a randomly initialised model) or --weights")
    if args.weights and format_of(Path(args.weights)) is not None:
        raise MobileNetError(f"{args.weights} is already exported: export the float weights")
    task = checkpoint_task_of(args.weights, args.model) if args.weights else None
    task = task or model_task(args.model)
    _check_preprocess_flags(args, task, fmt)
    _check_export_suffix(args, fmt)
    if task not in fmt.tasks:
        takes = [f"--format {f.name}" for f in export_formats().values() if task in f.tasks]
        raise MobileNetError(f"{task} models export to {' or '.join(takes)} only")
    # Formats of a task whose input may be HxW: the others' files take one side.
    wide = {name for name, commands in tasks().items() if commands.square_input is None}
    rectangular = [f.name for f in export_formats().values() if wide & set(f.tasks)]
    if isinstance(args.resolution, tuple) and fmt.name not in rectangular:
        raise MobileNetError(
            f"--resolution HxW applies to --format {' or '.join(rectangular)}; {fmt.name} takes N"
        )
    commands = task_named(task)
    if isinstance(args.resolution, tuple) and commands.square_input is not None:
        # eval, predict and the preprocessing a file keeps take a square's side
        raise MobileNetError(commands.square_input)
    return commands.export(args, fmt)


def _check_preprocess_flags(args: argparse.Namespace, task: str, fmt: Format) -> None:
    """Refuse preprocessing flags where nothing would keep them."""
    given = [dest for dest in PREPROCESS_FLAGS if getattr(args, dest) is not None]
    if not given:
        return
    flag, owners = flag_owners()[given[0]]
    if task not in owners:
        what = args.model or args.weights
        raise MobileNetError(
            f"{flag} applies to {' and '.join(owners)} models; {what} is a {task} model"
        )
    if not fmt.keeps_metadata:
        raise MobileNetError(f"{flag}: a {fmt.name} file keeps no metadata; use --format pt2")


def _implied_format(out: str) -> str | None:
    """The format whose files carry the suffix of ``out`` (None: no format's)."""
    suffix = Path(out).suffix
    named = (f for f in export_formats().values() if f.names_files and f.suffix == suffix)
    return next((f.name for f in named), None)


def _export_format(args: argparse.Namespace) -> str:
    """The format ``export`` writes: ``--format``, else the one the suffix of ``--out``
    names, else ONNX."""
    return args.format or _implied_format(args.out) or "onnx"


def _check_export_suffix(args: argparse.Namespace, fmt: Format) -> None:
    """Refuse an ``--out`` whose suffix names another format than the one written (eval
    and predict read a file by its suffix)."""
    if _implied_format(args.out) not in (None, fmt.name):
        raise MobileNetError(
            f"--format {fmt.name} writes a {fmt.suffix} file, not {Path(args.out).name}"
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
        args.model,
        args.width_mult,
        args.batch,
        args.resolution,
        args.threads,
        args.rounds,
        args.iterations,
    )
    if args.save:
        from ..formats.records import load_records

        load_records()  # a damaged record is refused before minutes of timing, not after
    result = run_bench(cfg, engines, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if args.save:
        from ..formats.records import save_measurements

        path = save_measurements(result)
        print(f"medians recorded in {path}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
