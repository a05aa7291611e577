"""The official checkpoints ``create_model(name, weights=KEY)`` can fetch, by key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..paths import cache_dir
from ..weights import fetch
from ..weights.hub import check_sha256, download

__all__ = ["PRETRAINED", "Pretrained", "list_pretrained", "resolve_weights"]


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


def list_pretrained(model: str | None = None) -> list[str]:
    """Names of the official checkpoints ``create_model(..., weights=NAME)`` can fetch."""
    return [k for k, v in PRETRAINED.items() if model is None or v.model == model]


def resolve_weights(spec: str | Path, sha256: str | None = None) -> Path:
    """An official checkpoint key, a URL or a local path -> a local file.

    ``sha256`` (or a prefix) is checked for URLs and local files; for an official
    checkpoint, whose hash is known, it must agree with it.
    """
    entry = PRETRAINED.get(str(spec)) or next(
        (x for x in PRETRAINED.values() if x.url == str(spec)), None
    )
    if entry is None:
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
