"""Training ablations: V2 Figure 6 (bottleneck, shortcut) and V1 Table 4 (depthwise vs full).

Every variant is trained with the ``demo`` recipe on the built-in data over several seeds
(the same seeds for every variant), and compared by the validation top-1 of its last
epoch: mean and standard deviation over seeds, with the accuracy curves and their spread.

* ``ablation-bottleneck`` (V2 Figure 6a): mobilenet_v2 as published (linear bottleneck: no
  activation after the projecting 1x1 conv) against the same network with ReLU6 after
  the projection.
* ``ablation-shortcut`` (V2 Figure 6b): residual connections between the bottlenecks (as
  published), between the expansions (the wide tensors: the expanded tensor of a block is
  added to the next block's, wherever their shapes agree, and the bottleneck residual is
  removed), and none at all. The first two blocks of a stage have expansions of different
  widths, so the expansion variant has one shortcut fewer per stage than the published one.
* ``depthwise-vs-full`` (V1 Table 4): mobilenet_v1 against mobilenet_v1_conv, the same
  network with full 3x3 convolutions, with their parameters, MAdds and CPU latency.

Both modes train on scikit-learn's 8x8 digits (1,347 training and 297 held-out images,
upsampled to 32x32): ``quick`` at width 0.25 for 4 epochs (minutes on two cores), the full
mode at width 0.5 for 8 epochs. ``--data mnist`` (the built-in MNIST subset, 4,000 training
images) or an image folder give a harder task at several times the cost.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..blocks import InvertedResidual
from ..errors import MobileNetError
from ..models import MobileNet, create_model
from .common import figure, markdown_table, save_figure, write_csv, write_json, write_text


class ExpansionShortcuts(nn.Sequential):
    """``features`` with shortcuts between expansions instead of between bottlenecks.

    For consecutive inverted residual blocks, the expanded tensor of one block is added to
    the expanded tensor of the next when their shapes agree; the blocks' own residual
    additions (between bottlenecks) are not used. Parameters and state-dict keys are those
    of the original ``features``.
    """

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        # Block i + 1 receives block i's expanded tensor when both are inverted residuals,
        # block i keeps the resolution (stride 1) and the two expansions are equally wide.
        self.linked = {
            i + 1
            for i, (a, b) in enumerate(itertools.pairwise(layers))
            if isinstance(a, InvertedResidual)
            and isinstance(b, InvertedResidual)
            and a.stride == 1
            and a.dw.conv.in_channels == b.dw.conv.in_channels
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        previous = None
        for index, layer in enumerate(self):
            if not isinstance(layer, InvertedResidual):
                x = layer(x)
                continue
            expanded = layer.expand(x)
            if index in self.linked:
                expanded = expanded + previous
            previous = expanded
            x = layer.project(layer.se(layer.dw(expanded)))
        return x


def _relu6_bottleneck(model: MobileNet) -> MobileNet:
    for block in model.features:
        if isinstance(block, InvertedResidual):
            block.project.act = nn.ReLU6()
    return model


def _no_shortcut(model: MobileNet) -> MobileNet:
    for block in model.features:
        if isinstance(block, InvertedResidual):
            block.add = None
    return model


def _expansion_shortcut(model: MobileNet) -> MobileNet:
    model.features = ExpansionShortcuts(*model.features)
    return model


def _as_published(model: MobileNet) -> MobileNet:
    return model


# name -> (registered model, change applied to it); the first variant is the paper's.
ABLATIONS: dict[str, dict[str, tuple[str, Callable[[MobileNet], MobileNet]]]] = {
    "ablation-bottleneck": {
        "linear": ("mobilenet_v2", _as_published),
        "relu6": ("mobilenet_v2", _relu6_bottleneck),
    },
    "ablation-shortcut": {
        "bottleneck": ("mobilenet_v2", _as_published),
        "expansion": ("mobilenet_v2", _expansion_shortcut),
        "none": ("mobilenet_v2", _no_shortcut),
    },
    "depthwise-vs-full": {
        "depthwise": ("mobilenet_v1", _as_published),
        "full": ("mobilenet_v1_conv", _as_published),
    },
}
CLAIMS = {
    "ablation-bottleneck": "the linear bottleneck is more accurate than the ReLU6 bottleneck",
    "ablation-shortcut": "shortcuts between bottlenecks are more accurate than between expansions "
    "and than none",
    "depthwise-vs-full": "depthwise separable convolutions lose little accuracy (about 1 "
    "point on ImageNet) for about 1/8 of the MAdds and parameters",
}


@dataclasses.dataclass(frozen=True)
class Setup:
    data: str
    resolution: int
    epochs: int
    width_mult: float
    seeds: tuple[int, ...]


def setup(quick: bool, data: str | None, seeds: int | None, epochs: int | None) -> Setup:
    base = (
        Setup("digits", 32, 4, 0.25, (0, 1, 2)) if quick else Setup("digits", 32, 8, 0.5, (0, 1, 2))
    )
    if seeds is not None:
        if seeds < 1:
            raise MobileNetError(f"--seeds must be >= 1, got {seeds}")
        base = dataclasses.replace(base, seeds=tuple(range(seeds)))
    if epochs is not None:
        if epochs < 1:
            raise MobileNetError(f"--epochs must be >= 1, got {epochs}")
        base = dataclasses.replace(base, epochs=epochs)
    if data is not None:
        base = dataclasses.replace(base, data=data)
    return base


def train_variant(
    model_name: str,
    change: Callable[[MobileNet], MobileNet],
    cfg: Setup,
    seed: int,
    out: Path,
) -> list[dict[str, Any]]:
    """Train one variant with one seed into ``out``; its per-epoch metrics.

    A finished run in ``out`` is read back instead of trained again, an interrupted one
    resumed.
    """
    from ..classification.task import TrainConfig, build_model, train
    from ..train import get_recipe

    if (out / "summary.json").is_file():
        return _history(out)
    recipe = dataclasses.replace(get_recipe("demo"), epochs=cfg.epochs, resolution=cfg.resolution)
    train_cfg = TrainConfig(
        model_name,
        cfg.data,
        out,
        recipe,
        width_mult=cfg.width_mult,
        seed=seed,
        workers=0,
        progress=False,
        resume=(out / "last.pt").is_file(),
    )
    torch.manual_seed(seed)  # the variant's initial weights
    model = change(build_model(train_cfg))
    train(train_cfg, model=model)
    return _history(out)


def _history(run: Path) -> list[dict[str, Any]]:
    with (run / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def run_ablation(
    name: str,
    out: Path,
    quick: bool = False,
    data: str | None = None,
    seeds: int | None = None,
    epochs: int | None = None,
    **_: Any,
) -> dict[str, Any]:
    variants = ABLATIONS[name]
    cfg = setup(quick, data, seeds, epochs)
    histories: dict[str, list[list[dict[str, Any]]]] = {v: [] for v in variants}
    start = time.perf_counter()
    for seed in cfg.seeds:  # seed-major: a partial run already compares every variant
        for variant, (model_name, change) in variants.items():
            history = train_variant(
                model_name, change, cfg, seed, out / "runs" / f"{variant}-seed{seed}"
            )
            histories[variant].append(history)
            print(
                f"{name}: {variant} seed {seed}: val top-1 {history[-1]['val_top1']:.2f}%",
                file=sys.stderr,
                flush=True,
            )
    seconds = time.perf_counter() - start

    rows = []
    for variant, runs in histories.items():
        finals = [h[-1]["val_top1"] for h in runs]
        model_name, change = variants[variant]
        model = change(create_model(model_name, width_mult=cfg.width_mult, num_classes=10))
        rows.append(
            {
                "variant": variant,
                "model": model_name,
                "seeds": len(finals),
                "top1_mean": round(statistics.mean(finals), 3),
                "top1_std": round(statistics.stdev(finals), 3) if len(finals) > 1 else 0.0,
                "top1_per_seed": finals,
                "params": sum(p.numel() for p in model.parameters()),
                "madds": _madds(model, cfg.resolution),
            }
        )
    if name == "depthwise-vs-full":
        _add_full_size_costs(rows)

    _plot_curves(histories, out / f"{name}.png", name, cfg)
    write_csv(
        out / "results.csv", [{k: v for k, v in r.items() if k != "top1_per_seed"} for r in rows]
    )
    verdict = _verdict(name, rows)
    record = {
        "experiment": name,
        "setup": dataclasses.asdict(cfg),
        "seconds": round(seconds),
        "rows": rows,
        "claim": CLAIMS[name],
        **verdict,
    }
    write_json(out / "results.json", record)
    write_text(out / "report.md", _report(name, cfg, rows, verdict, seconds))
    return {k: record[k] for k in ("reproduced", "separated")} | {
        r["variant"]: f"{r['top1_mean']:.2f} +- {r['top1_std']:.2f}" for r in rows
    }


def _madds(model: MobileNet, resolution: int) -> int:
    from ..cost import cost

    return cost(model, resolution).madds


def _add_full_size_costs(rows: list[dict[str, Any]]) -> None:
    """Params, MAdds and batch-1 CPU latency of the full-size networks at 224 (V1 Table 4)."""
    from ..cost import cost
    from ..export import prepare_for_inference

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    for row in rows:
        model = create_model(row["model"])
        c = cost(model, 224)
        fused = prepare_for_inference(model)
        with torch.inference_mode():
            fused(x)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fused(x)
                times.append(time.perf_counter() - t0)
        row["params_224"] = c.params
        row["madds_224"] = c.madds
        row["latency_ms_224"] = round(1000 * statistics.median(times), 2)


def _verdict(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {r["variant"]: r for r in rows}
    first, *others = rows
    if name == "depthwise-vs-full":
        drop = by["full"]["top1_mean"] - by["depthwise"]["top1_mean"]
        ratio = by["depthwise"]["madds"] / by["full"]["madds"]
        reproduced = drop <= 2.0 and ratio < 0.2
        separated = abs(drop) > by["full"]["top1_std"] + by["depthwise"]["top1_std"]
        return {
            "reproduced": reproduced,
            "separated": separated,
            "accuracy_cost_points": round(drop, 3),
            "madds_ratio": round(ratio, 4),
        }
    comparisons = [
        {
            "against": o["variant"],
            "difference": round(first["top1_mean"] - o["top1_mean"], 3),
            # Separated: the means are further apart than one standard deviation each.
            "separated": first["top1_mean"] - first["top1_std"] > o["top1_mean"] + o["top1_std"],
        }
        for o in others
    ]
    return {
        "reproduced": all(c["difference"] > 0 for c in comparisons),
        "separated": all(c["separated"] for c in comparisons),
        "comparisons": comparisons,
    }


def _plot_curves(histories, path: Path, name: str, cfg: Setup) -> None:
    fig, axes = figure(size=(6.5, 4.5))
    ax = axes[0][0]
    for variant, runs in histories.items():
        epochs = [int(row["epoch"]) for row in runs[0]]
        curves = torch.tensor([[row["val_top1"] for row in h] for h in runs])
        mean = curves.mean(0)
        std = curves.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        ax.plot(epochs, mean, marker="o", label=f"{variant} (final {mean[-1]:.2f}%)")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    low = min(
        min(row["val_top1"] for row in h[len(h) // 2 :]) for r in histories.values() for h in r
    )
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(
        f"{name}: {cfg.data} at {cfg.resolution}x{cfg.resolution}, width "
        f"{cfg.width_mult:g}, mean +- std over {len(cfg.seeds)} seeds"
    )
    save_figure(fig, path)


def _report(name, cfg: Setup, rows, verdict, seconds: float) -> str:
    header = ["variant", "model", "top-1 mean", "std", "per seed", "params", "MAdds"]
    body = [
        [
            r["variant"],
            r["model"],
            f"{r['top1_mean']:.2f}",
            f"{r['top1_std']:.2f}",
            ", ".join(f"{v:.1f}" for v in r["top1_per_seed"]),
            f"{r['params']:,}",
            f"{r['madds'] / 1e6:.1f}M",
        ]
        for r in rows
    ]
    text = f"""# {name}

Claim: {CLAIMS[name]}.

Setup: {cfg.data}, {cfg.resolution}x{cfg.resolution}, width {cfg.width_mult:g}, the demo
recipe for {cfg.epochs} epochs, seeds {list(cfg.seeds)} (the same for every variant);
{seconds / 60:.1f} minutes in all. Validation top-1 of the last epoch:

{markdown_table(header, body)}

"""
    if name == "depthwise-vs-full":
        sizes = [
            [
                r["variant"],
                f"{r['params_224']:,}",
                f"{r['madds_224'] / 1e6:.1f}M",
                f"{r['latency_ms_224']:.1f}",
            ]
            for r in rows
        ]
        text += (
            "Full size (224x224, 1000 classes; latency: PyTorch, BatchNorm folded, batch 1):\n\n"
        )
        text += markdown_table(["variant", "params", "MAdds", "latency ms"], sizes) + "\n\n"
        text += (
            f"Depthwise separable costs {verdict['madds_ratio']:.3f} of the MAdds of full "
            f"convolutions at the training size, for an accuracy difference of "
            f"{verdict['accuracy_cost_points']:+.2f} points (full minus depthwise). "
        )
    first = rows[0]["variant"]
    for c in verdict.get("comparisons", []):
        spread = "beyond" if c["separated"] else "within"
        text += (
            f"- {first} vs {c['against']}: {c['difference']:+.2f} points ({spread} one "
            "standard deviation of each)\n"
        )
    text += (
        f"\nThe paper's claim was **{'reproduced' if verdict['reproduced'] else 'not reproduced'}**"
        f" on this data{' (the order of the means)' if 'comparisons' in verdict else ''}"
    )
    if verdict["separated"]:
        text += ", with every difference larger than the seed-to-seed spread.\n"
    else:
        text += (
            "; not every difference is larger than the seed-to-seed spread, so this data "
            "does not separate all the variants (see the lines above).\n"
        )
    return text + f"\n![curves]({name}.png)\n"
