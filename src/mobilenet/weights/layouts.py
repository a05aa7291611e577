"""Checkpoint layouts: each model family registers the layouts it can read.

A :class:`Layout` says how to recognise a state dict written by some library, how to
rename its tensors into the family's own names, which BatchNorm epsilon it trained with
and how many classes it predicts. The families register theirs beside their code
(``mobilenet.models.layouts`` for the classifiers, ``mobilenet.detection.weights`` for
SSDLite), so this module knows no family and adding a layout touches one file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .fit import fit_state_dict
from .io import FORMAT, PathLike, StateDict, read_state_dict, saved_config

__all__ = [
    "Layout",
    "find_layout",
    "infer_num_classes",
    "load_weights",
    "register_layout",
    "with_origin",
]

Tensors = Mapping[str, torch.Tensor]


def _same(state_dict: StateDict, model: nn.Module) -> StateDict:
    return state_dict


@dataclass(frozen=True)
class Layout:
    """One library's way of naming a family's tensors."""

    name: str  # "mobilenet" (ours), "torchvision", "timm", ...
    family: type[nn.Module]  # the model class it loads into (subclasses included)
    matches: Callable[[Tensors], bool]
    num_classes: Callable[[Tensors], int]  # outputs of the checkpoint's classifier
    translate: Callable[[StateDict, nn.Module], StateDict] = _same
    bn_eps: Callable[[Tensors], float | None] = lambda state_dict: None
    # Config values the checkpoint was trained with, from its tensors, its metadata (with
    # the caller's "origin") and its name: {"padding": "same", "bn_eps": 1e-3, ...}. The
    # model takes them or refuses the checkpoint (its check_settings / apply_settings).
    settings: Callable[[Tensors, Mapping[str, str], str], Mapping[str, Any]] = (
        lambda state_dict, metadata, name: {}
    )


_LAYOUTS: list[Layout] = []


def register_layout(layout: Layout) -> Layout:
    """Make ``layout`` known to :func:`load_weights`: first registered, first tried, except
    that a subclass's layouts come before its base classes' (MobileNetV4's timm layout
    before that of the MobileNet classifiers it derives from)."""
    _LAYOUTS.append(layout)
    return layout


def find_layout(state_dict: Tensors, family: type[nn.Module] | None = None) -> Layout:
    """The registered layout ``state_dict`` is written in (for ``family``, if given)."""
    candidates = [x for x in _LAYOUTS if family is None or issubclass(family, x.family)]
    candidates.sort(key=lambda x: -len(x.family.__mro__))  # stable: most derived first
    for layout in candidates:
        if layout.matches(state_dict):
            return layout
    sample = ", ".join(list(state_dict)[:3])
    known = ", ".join(sorted({x.name for x in candidates})) or "none registered"
    what = family.__name__ if family is not None else "any model"
    raise CheckpointError(
        f"unrecognised checkpoint layout for {what} (first keys: {sample}); known layouts: {known}"
    )


def infer_num_classes(state_dict: Tensors, family: type[nn.Module] | None = None) -> int:
    """Number of classes of a checkpoint's classifier, in any registered layout."""
    return find_layout(state_dict, family).num_classes(state_dict)


def load_weights(
    model: nn.Module,
    checkpoint: PathLike | Tensors,
    source_name: str | None = None,
    metadata: Mapping[str, str] | None = None,
    origin: str | None = None,
) -> str:
    """Load a checkpoint into ``model`` in place; returns the name of its layout.

    ``checkpoint`` is a path (safetensors, or a pickled state dict read with
    ``weights_only=True``) or an in-memory state dict (with the ``metadata`` read along
    with it, if any). Raises :class:`~mobilenet.CheckpointError` naming the missing,
    unexpected and mis-shaped tensors when it does not fit; the model is then left
    untouched. Each source trained with its own BatchNorm epsilon; loading sets it, so
    outputs match the source exactly.

    ``origin`` names what a foreign checkpoint was trained as where its tensors cannot
    tell (``"timm:tf_mobilenetv3_large_075"``: TensorFlow padding, not PyTorch's); the
    settings it implies (padding, BatchNorm epsilon) are set on the model, or the
    checkpoint is refused in one line if the model cannot take them.
    """
    state_dict, metadata, name = read_state_dict(checkpoint, source_name, metadata)
    return load_tensors(model, state_dict, metadata, name, origin)


def load_tensors(
    model: nn.Module,
    state_dict: Tensors,
    metadata: Mapping[str, str],
    source_name: str,
    origin: str | None = None,
) -> str:
    """:func:`load_weights` of a checkpoint already read: its tensors and metadata."""
    name = source_name
    metadata = with_origin(metadata, origin)
    layout = find_layout(state_dict, type(model))
    saved = saved_config(metadata) if layout.name == FORMAT else None
    settings = dict(layout.settings(state_dict, metadata, name))
    try:
        translated = layout.translate(state_dict, model)
    except CheckpointError as e:  # a translator says which model the checkpoint holds
        raise CheckpointError(f"{name}: {e}") from None
    fit_state_dict(
        model,
        translated,
        name,
        layout.name,
        saved=saved,
        bn_eps=settings.pop("bn_eps", layout.bn_eps(state_dict)),
        settings=settings,
    )
    return layout.name


def with_origin(metadata: Mapping[str, str], origin: str | None) -> Mapping[str, str]:
    """``metadata`` with the caller's ``origin`` (see :func:`load_weights`), if any."""
    return {**metadata, "origin": origin} if origin else metadata
