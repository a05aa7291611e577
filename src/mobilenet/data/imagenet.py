"""The ImageNet-1k classes: WordNet ids and names in the standard index order.

The index order of every ImageNet-1k checkpoint (torchvision, timm, Keras, ours trained on
an ILSVRC folder) is the sorted order of the 1,000 WordNet ids, which is also the order
torchvision's ``ImageFolder`` gives a full ILSVRC training or validation folder
(``n01440764/``, ``n01443537/``, ...). The ids and names ship with the package
(``imagenet_classes.tsv``: the names are torchvision's ``_IMAGENET_CATEGORIES``, the ids
timm's ``imagenet_synsets.txt``), so a validation folder holding only some of the 1,000
class folders still maps each to its own index.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import MobileNetError

__all__ = [
    "IMAGENET_CLASSES",
    "check_imagenet_folder",
    "default_classes",
    "folder_classes",
    "imagenet_names",
    "imagenet_wnids",
    "is_imagenet",
]

IMAGENET_CLASSES = 1000


@cache
def _table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files(__package__).joinpath("imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    assert len(rows) == IMAGENET_CLASSES, "imagenet_classes.tsv is damaged"
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def imagenet_wnids() -> list[str]:
    """The 1,000 WordNet ids (``n01440764``, ...), in index order (sorted)."""
    return list(_table()[0])


def imagenet_names() -> list[str]:
    """The 1,000 class names (``tench``, ``goldfish``, ...), in index order."""
    return list(_table()[1])


def default_classes(num_classes: int) -> list[str]:
    """Names for a checkpoint that keeps none: ImageNet's for 1,000 classes, else numbers."""
    if num_classes == IMAGENET_CLASSES:
        return imagenet_names()
    return [str(i) for i in range(num_classes)]


def folder_classes(classes: list[str]) -> list[str]:
    """The class folder names a model's data is read with: ImageNet's WordNet ids for an
    ImageNet-1k model (``n01440764/`` ..., in the 1,000 classes' order), else its classes."""
    return imagenet_wnids() if is_imagenet(classes) else classes


def is_imagenet(classes: Sequence[str]) -> bool:
    """Whether ``classes`` are the ImageNet-1k classes, by name or by WordNet id."""
    return len(classes) == IMAGENET_CLASSES and (
        list(classes) == imagenet_names() or list(classes) == imagenet_wnids()
    )


def check_imagenet_folder(root: str | Path) -> None:
    """Refuse, in one line, a folder whose class sub-folders are not ImageNet-1k WordNet
    ids: its images could not be given their class index."""
    root = Path(root)
    known = set(imagenet_wnids())
    try:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    except OSError as e:
        raise MobileNetError(f"cannot list {root}: {e.strerror or e}") from None
    unknown = [f for f in folders if f not in known]
    if unknown:
        shown = ", ".join(unknown[:5]) + (
            f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        )
        what = (
            "not ImageNet-1k WordNet ids" if len(unknown) > 1 else "not an ImageNet-1k WordNet id"
        )
        raise MobileNetError(
            f"{root}: an ImageNet-1k model is evaluated on the ILSVRC layout (one folder per "
            f"WordNet id, e.g. n01440764/); {shown}: {what}"
        )
