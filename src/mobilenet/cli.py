"""The ``mobilenet`` command line: ``mobilenet cost``, ``mobilenet convert``, ``mobilenet list``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__
from .cost import LAYER_TYPES, Cost, check_resolution, cost
from .errors import MobileNetError
from .models import create_model, list_models

__all__ = ["main"]


def _width(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _resolution(text: str) -> int:
    try:
        return check_resolution(int(text))
    except MobileNetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 32, got {text!r}") from None


def _classes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _model_name(text: str) -> str:
    if text not in list_models():
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose from: {', '.join(list_models())}"
        )
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width-mult", type=_width, default=1.0, help="width multiplier alpha")
    p.add_argument("--num-classes", type=_classes, default=None, help="classifier outputs")


class _Parser(argparse.ArgumentParser):
    """Bad flags get one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mobilenet",
        description="The MobileNet family (V1, V2, V3), as the papers describe it.",
    )
    parser.add_argument("--version", action="version", version=f"mobilenet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the registered models and official checkpoints")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cost", help="params, multiply-adds and activation memory of a model")
    p.add_argument("model", nargs="?", type=_model_name, help="model name (see `mobilenet list`)")
    p.add_argument("--all", action="store_true", help="one row per registered model")
    _add_model_args(p)
    p.add_argument("--resolution", type=_resolution, default=224, help="input size (>= 32)")
    p.add_argument("--per-layer", action="store_true", help="also list every layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("convert", help="convert a torchvision/timm checkpoint to safetensors")
    p.add_argument("src", help="checkpoint: torchvision or timm state dict, or ours")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", required=True, type=_model_name, help="model name")
    _add_model_args(p)
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except MobileNetError as e:
        print(f"mobilenet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `mobilenet cost --all --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    from .weights import PRETRAINED

    print("models:")
    for name in list_models():
        print(f"  {name}")
    print("official checkpoints (create_model(name, weights=...)):")
    for key, entry in PRETRAINED.items():
        print(f"  {key:<30} top-1 {entry.top1:.2f}%  {entry.url}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    if args.all == (args.model is not None):
        raise MobileNetError("give a model name or --all (not both)")
    names = list_models() if args.all else [args.model]
    kwargs: dict = {"width_mult": args.width_mult}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    costs = [cost(create_model(name, **kwargs), args.resolution) for name in names]
    if args.json:
        dicts = [c.to_dict(per_layer=args.per_layer) for c in costs]
        print(json.dumps(dicts if args.all else dicts[0], indent=2))
        return 0
    print(_summary_table(costs))
    if not args.all:
        print()
        print(_type_table(costs[0]))
    if args.per_layer:
        for c in costs:
            print()
            print(_layer_table(c))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import detect_source, load_weights, read_checkpoint, save_weights

    state_dict, metadata = read_checkpoint(args.src)
    kwargs: dict = {"width_mult": args.width_mult}
    if args.num_classes is None:
        from .weights import infer_num_classes

        kwargs["num_classes"] = infer_num_classes(state_dict)
    else:
        kwargs["num_classes"] = args.num_classes
    model = create_model(args.model, **kwargs)
    source = detect_source(state_dict)
    load_weights(model, state_dict, source_name=args.src, metadata=metadata)
    save_weights(model, args.dst, {"converted_from": source})
    cfg = model.config
    print(
        f"wrote {args.dst}: {cfg.name} (width {cfg.width_mult}, {cfg.num_classes} classes, "
        f"BatchNorm eps {cfg.bn_eps:g}) from a {source} checkpoint"
    )
    return 0


# --------------------------------------------------------------------------- tables


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows)])


def _summary_table(costs: Sequence[Cost]) -> str:
    header = ["model", "width", "res", "params", "MAdds", "largest act", "peak act (fp32)"]
    rows = [
        [
            c.model,
            f"{c.width_mult:g}",
            str(c.resolution),
            f"{c.params:,}",
            f"{c.madds / 1e6:,.1f}M",
            _mb(c.largest_activation_bytes),
            _mb(c.peak_activation_bytes),
        ]
        for c in costs
    ]
    return _table(header, rows, right={1, 2, 3, 4, 5, 6})


def _type_table(c: Cost) -> str:
    header = ["layer type", "params", "share", "MAdds", "share"]
    rows = []
    for kind, v in c.by_type.items():
        if kind not in LAYER_TYPES and not v["params"]:
            continue
        rows.append(
            [
                kind,
                f"{v['params']:,}",
                f"{100 * v['params'] / c.params:.2f}%",
                f"{v['madds']:,}",
                f"{100 * v['madds'] / c.madds:.2f}%" if c.madds else "-",
            ]
        )
    return _table(header, rows, right={1, 2, 3, 4})


def _layer_table(c: Cost) -> str:
    header = ["layer", "type", "output", "params", "MAdds"]
    rows = [
        [
            layer.name,
            layer.type,
            "x".join(map(str, layer.output_shape[1:])),
            f"{layer.params:,}",
            f"{layer.madds:,}",
        ]
        for layer in c.layers
    ]
    return f"{c.model} per layer\n" + _table(header, rows, right={3, 4})


if __name__ == "__main__":
    sys.exit(main())
