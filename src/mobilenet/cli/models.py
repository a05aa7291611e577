"""``mobilenet list``, ``mobilenet cost``, ``mobilenet convert``: the zoo and its costs."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from ..cost import LAYER_TYPES, Cost, cost
from ..errors import MobileNetError
from ..limits import meta_model
from ..models import list_models
from ..models.registry import TASKS
from .args import add_model_args, model_kwargs, model_name, resolution_hw

__all__ = ["add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", help="list the registered models and official checkpoints")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("cost", help="params, multiply-adds and activation memory of a model")
    p.add_argument("model", nargs="?", type=model_name(), help="model name (see `mobilenet list`)")
    p.add_argument("--all", action="store_true", help="one row per registered classifier")
    add_model_args(p)
    p.add_argument(
        "--resolution",
        type=resolution_hw,
        help="input size: N or HxW (>= 32; default: each model's own, 224 for V1-V3, "
        "V4's 224/256/384 as its paper table)",
    )
    p.add_argument("--per-layer", action="store_true", help="also list every layer")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser(
        "convert", help="convert a torchvision/timm/Keras checkpoint to our safetensors"
    )
    p.add_argument(
        "src", help="checkpoint: torchvision or timm state dict, Keras .h5/.keras, or ours"
    )
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", required=True, type=model_name(), help="model name")
    p.add_argument(
        "--from",
        dest="origin",
        metavar="LIBRARY:MODEL",
        help="what the checkpoint was trained as, where its tensors cannot tell: "
        "timm:tf_mobilenetv3_large_075 (TF padding) or timm:mobilenetv3_large_100",
    )
    add_model_args(p)
    p.set_defaults(func=cmd_convert)


def cmd_list(args: argparse.Namespace) -> int:
    from ..models.pretrained import PRETRAINED

    for task in TASKS:
        print(f"{task} models:")
        for name in list_models(task=task):
            print(f"  {name}")
    print("official checkpoints (create_model(name, weights=...)):")
    for key, entry in PRETRAINED.items():
        print(f"  {key:<30} top-1 {entry.top1:.2f}%  {entry.url}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    if args.all == (args.model is not None):
        raise MobileNetError("give a model name or --all (not both)")
    # --all: every classifier, then the encoders (their cost is the trunk's and the MSFA's)
    names = list_models() + list_models(task="encoder") if args.all else [args.model]
    # Built on the meta device: shapes only, so any width and resolution costs nothing.
    models = [meta_model(name, **model_kwargs(args)) for name in names]
    costs = [cost(m, args.resolution or _default_resolution(m)) for m in models]
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
    from ..models import model_from_checkpoint
    from ..weights import find_layout, read_checkpoint, save_weights

    state_dict, metadata = read_checkpoint(args.src)
    model = model_from_checkpoint(
        args.model, state_dict, metadata, args.src, args.origin, **model_kwargs(args)
    )
    layout = find_layout(state_dict, type(model))
    extra = {"converted_from": layout.name}
    if args.origin:  # the card's origin is an object: the layout read and what was named
        extra["origin"] = json.dumps({"layout": layout.name, "source": args.origin})
    # The file keeps the checkpoint's preprocessing (model.preprocess, set on loading:
    # [-1, 1] for the authors' TF checkpoints).
    save_weights(model, args.dst, extra)
    cfg = model.config
    build = ", Keras' build" if getattr(cfg, "keras", False) else ""
    print(
        f"wrote {args.dst}: {cfg.name} (width {cfg.width_mult}, {cfg.num_classes} classes, "
        f"BatchNorm eps {cfg.bn_eps:g}, {getattr(cfg, 'padding', 'symmetric')} padding{build}) "
        f"from a {layout.name} checkpoint"
    )
    return 0


def _default_resolution(model: object) -> int:
    """The model's own evaluation size (MobileNetV4's Conv-M and Hybrid-M 256, the large
    ones 384: the paper's ImageNet table), 224 for a model that names none."""
    return getattr(getattr(model, "eval_config", None), "resolution", 224)


# --------------------------------------------------------------------------- tables


def _size(resolution: int | tuple[int, int]) -> str:
    """A side as given (``224``), a pair as ``HxW``."""
    return str(resolution) if isinstance(resolution, int) else "x".join(map(str, resolution))


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
            _size(c.resolution),
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
