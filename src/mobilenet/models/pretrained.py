"""The official checkpoints ``create_model(name, weights=KEY)`` can fetch, by key, and
the timm checkpoints of the Hugging Face Hub, by hub id (``hf-hub:timm/MODEL.TAG``)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, MobileNetError
from ..paths import cache_dir
from ..weights import fetch, sha256_file
from ..weights.gemma3n import is_sharded_checkpoint
from ..weights.hf_hub import (
    HubConfig,
    HubId,
    fetch_hub_config,
    fetch_hub_weights,
    is_hub_id,
    parse_hub_id,
    write_hub_checkpoint,
)
from ..weights.hub import check_sha256, download
from .layouts import TIMM_V3_MODELS

__all__ = [
    "PRETRAINED",
    "TIMM_MODELS",
    "Pretrained",
    "hub_weights",
    "list_pretrained",
    "resolve_weights",
    "timm_model",
]


@dataclass(frozen=True)
class Pretrained:
    """An official checkpoint: where it lives, its SHA-256 (or a prefix of it), its model."""

    model: str
    url: str
    sha256: str
    top1: float  # ImageNet-1k top-1 reported by the publisher


PRETRAINED: dict[str, Pretrained] = {
    # torchvision's files carry the first 8 hex digits of their SHA-256 in their names.
    "mobilenet_v2.tv_in1k": Pretrained(
        "mobilenet_v2",
        "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
        "b0353104",
        71.878,
    ),
    "mobilenet_v2.tv2_in1k": Pretrained(
        "mobilenet_v2",
        "https://download.pytorch.org/models/mobilenet_v2-7ebf99e0.pth",
        "7ebf99e0",
        72.154,
    ),
    "mobilenet_v3_large.tv_in1k": Pretrained(
        "mobilenet_v3_large",
        "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth",
        "8738ca79",
        74.042,
    ),
    "mobilenet_v3_large.tv2_in1k": Pretrained(
        "mobilenet_v3_large",
        "https://download.pytorch.org/models/mobilenet_v3_large-5c1a4163.pth",
        "5c1a4163",
        75.274,
    ),
    "mobilenet_v3_small.tv_in1k": Pretrained(
        "mobilenet_v3_small",
        "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
        "047dcff4",
        67.668,
    ),
}


def _timm_v3(name: str) -> tuple[str, float]:
    """``tf_mobilenetv3_large_minimal_100`` -> ``("mobilenet_v3_large_minimal", 1.0)``."""
    variant, _, width = name.removeprefix("tf_").removeprefix("mobilenetv3_").rpartition("_")
    return f"mobilenet_v3_{variant}", int(width) / 100


# timm's architectures (a hub config's "architecture") -> our model and width: those whose
# state dicts give timm's outputs (tests/test_weights.py, tests/test_mobilenet_v4.py). The
# V3 names are the classifiers' layouts' own list; timm's default tags of
# mobilenet.data.published.TIMM_DEFAULTS map back through this table.
TIMM_MODELS: dict[str, tuple[str, float]] = {
    "mobilenetv1_100": ("mobilenet_v1", 1.0),
    "mobilenetv1_125": ("mobilenet_v1", 1.25),
    "mobilenetv2_035": ("mobilenet_v2", 0.35),
    "mobilenetv2_050": ("mobilenet_v2", 0.5),
    "mobilenetv2_075": ("mobilenet_v2", 0.75),
    "mobilenetv2_100": ("mobilenet_v2", 1.0),
    "mobilenetv2_140": ("mobilenet_v2", 1.4),
    **{name: _timm_v3(name) for name in TIMM_V3_MODELS},
    "mobilenetv4_conv_small": ("mobilenet_v4_conv_small", 1.0),
    "mobilenetv4_conv_small_035": ("mobilenet_v4_conv_small", 0.35),
    "mobilenetv4_conv_small_050": ("mobilenet_v4_conv_small", 0.5),
    "mobilenetv4_conv_medium": ("mobilenet_v4_conv_medium", 1.0),
    "mobilenetv4_conv_large": ("mobilenet_v4_conv_large", 1.0),
    "mobilenetv4_hybrid_medium": ("mobilenet_v4_hybrid_medium", 1.0),
    "mobilenetv4_hybrid_medium_075": ("mobilenet_v4_hybrid_medium", 0.75),
    "mobilenetv4_hybrid_large": ("mobilenet_v4_hybrid_large", 1.0),
    "mobilenetv4_hybrid_large_075": ("mobilenet_v4_hybrid_large", 0.75),
    # timm's own variants and MobileNetV5 (the width is each model's own)
    "mobilenetv2_110d": ("mobilenet_v2_110d", 1.1),
    "mobilenetv2_120d": ("mobilenet_v2_120d", 1.2),
    "mobilenetv3_large_150d": ("mobilenet_v3_large_150d", 1.5),
    "mobilenetv4_conv_aa_medium": ("mobilenet_v4_conv_aa_medium", 1.0),
    "mobilenetv4_conv_blur_medium": ("mobilenet_v4_conv_blur_medium", 1.0),
    "mobilenetv4_conv_aa_large": ("mobilenet_v4_conv_aa_large", 1.0),
    "mobilenetv5_300m": ("mobilenet_v5_300m", 1.0),
    "mobilenetv5_300m_enc": ("mobilenet_v5_300m_enc", 1.0),
    "mobilenetv5_base": ("mobilenet_v5_base", 1.0),
}


def timm_model(architecture: str, where: str) -> tuple[str, float]:
    """Our model and width for a timm architecture; one that we do not build is refused
    in one line naming it (``where``: the hub id)."""
    if architecture not in TIMM_MODELS:
        raise CheckpointError(
            f"{where}: timm's {architecture[:100]!r} is not a model this toolkit builds; "
            f"known timm models: {', '.join(TIMM_MODELS)}"
        )
    return TIMM_MODELS[architecture]


def list_pretrained(model: str | None = None) -> list[str]:
    """Names of the official checkpoints ``create_model(..., weights=NAME)`` can fetch."""
    return [k for k, v in PRETRAINED.items() if model is None or v.model == model]


def resolve_weights(spec: str | Path, sha256: str | None = None, model: str | None = None) -> Path:
    """An official checkpoint key, a hub id (``hf-hub:timm/MODEL.TAG``, see
    :func:`hub_weights`), a URL or a local path -> a local file (or a folder: a sharded
    Transformers checkpoint, see :mod:`mobilenet.weights.gemma3n`).

    ``sha256`` (or a prefix) is checked for URLs, local files and a hub repo's
    ``model.safetensors``; for an official checkpoint, whose hash is known, it must agree
    with it. ``model``: the model the caller builds; a hub checkpoint of another one is
    refused in one line.
    """
    if is_hub_id(spec):
        return hub_weights(str(spec), sha256, model)
    entry = PRETRAINED.get(str(spec)) or next(
        (x for x in PRETRAINED.values() if x.url == str(spec)), None
    )
    if entry is None:
        if sha256 is not None and is_sharded_checkpoint(str(spec)):
            # A digest checks one file: the index's would leave every shard unchecked.
            raise CheckpointError(
                f"{spec} is a sharded checkpoint (Gemma 3n's vision tower is read from its "
                "shards): an expected SHA-256 checks a single file"
            )
        return fetch(spec, sha256)
    expected = check_sha256(sha256) or entry.sha256
    if not (expected.startswith(entry.sha256) or entry.sha256.startswith(expected)):
        raise CheckpointError(
            f"{spec} has the SHA-256 {entry.sha256}..., not the expected {expected}"
        )
    # Official files sit directly in the cache folder, as they always have (a cache filled
    # before stays valid): their names carry their hash, which is checked on every use.
    longest = max(expected, entry.sha256, key=len)
    return download(entry.url, longest, directory=cache_dir())


def hub_weights(spec: str, sha256: str | None = None, model: str | None = None) -> Path:
    """A timm checkpoint of the Hugging Face Hub as our safetensors file, with its card.

    ``config.json`` is fetched first (a timm repo of a model we do not build is refused
    before anything is fetched, by its name), then ``model.safetensors`` of the same
    commit, both through ``huggingface_hub`` (:mod:`mobilenet.weights.hf_hub`). The file
    written to ``$MOBILENET_HOME/hf-hub/<timm architecture>/<org>--<name>/`` holds the
    hub's tensors unchanged (timm's layout, loaded as any timm state dict: the
    architecture in its path tells ``tf_`` V3 weights from the others) and the card: our
    model, width and classes, the input size, and the config's ``pretrained_cfg`` as the
    preprocessing (:func:`hub_card`). It is written once per commit and card.
    """
    hub_id = parse_hub_id(spec)
    if hub_id.org == "timm":  # timm's repos are named MODEL.TAG
        _check_model(timm_model(hub_id.model, spec), model, spec)
    commit, config = fetch_hub_config(hub_id)
    ours = timm_model(config.architecture, spec)
    _check_model(ours, model, spec)
    weights = fetch_hub_weights(hub_id, commit)
    expected = check_sha256(sha256)
    if expected is not None and not (digest := sha256_file(weights)).startswith(expected):
        raise CheckpointError(
            f"{spec}: model.safetensors has the SHA-256 {digest[:16]}..., not the expected "
            f"{expected}"
        )
    metadata = hub_card(hub_id, commit, config, *ours)
    key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "hf-hub" / config.architecture / f"{hub_id.org}--{hub_id.name}"
    target = folder / f"{commit[:12]}-{key}.safetensors"
    if not target.is_file():
        write_hub_checkpoint(weights, metadata, target, spec)
    return target


def _check_model(ours: tuple[str, float], model: str | None, spec: str) -> None:
    if model is not None and model != ours[0]:
        raise CheckpointError(f"{spec} holds {ours[0]} (width {ours[1]}), not {model}")


def hub_card(
    hub_id: HubId, commit: str, config: HubConfig, model: str, width: float
) -> dict[str, str]:
    """The card of a hub checkpoint (card keys of :mod:`mobilenet.card`, as strings): the
    config's ``pretrained_cfg`` is its preprocessing, checked as every preprocessing is;
    its ``test_input_size`` and ``test_crop_pct``, when given, are kept as
    ``test_preprocess``; ImageNet's WordNet ids as label names leave ImageNet's class
    names in place."""
    from ..data.imagenet import imagenet_wnids
    from ..data.preprocess import Preprocess

    name = str(hub_id)
    try:
        preprocess = Preprocess.from_dict(config.preprocess(name))
        test = Preprocess.from_dict(config.preprocess(name, test=True))
    except MobileNetError as e:
        raise CheckpointError(f"{name}: config.json pretrained_cfg: {e}") from None
    ours = {"name": model, "width_mult": width, "num_classes": config.num_classes}
    card = {
        "card": "1",
        "task": "classification",
        "precision": "float32",
        "config": json.dumps(ours),
        "resolution": str(config.input_size[0]),
        "preprocess": preprocess.to_json(),
        "source": name,
        "hub_commit": commit,
    }
    labels = config.label_names
    if labels is not None and list(labels) != imagenet_wnids():
        card["classes"] = json.dumps(list(labels))
    if test != preprocess:
        card["test_preprocess"] = test.to_json()
    return card
