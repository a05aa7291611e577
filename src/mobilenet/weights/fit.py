"""Fitting a state dict into a model: strict, all or nothing, every mismatch named."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .io import StateDict

__all__ = ["check_fits", "check_values", "fit_state_dict"]


def fit_state_dict(
    model: nn.Module,
    state_dict: StateDict,
    name: str,
    source: str,
    saved: Mapping[str, Any] | None = None,
    bn_eps: float | None = None,
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Load ``state_dict`` (already in the model's own names) into ``model``.

    ``saved`` is the config stored with one of our own files: it must name the same model,
    and its BatchNorm epsilon wins over ``bn_eps`` (the epsilon the source trained with).
    The fit is checked before anything is copied: on any mismatch the model is untouched.
    ``settings`` (config values the checkpoint needs, e.g. ``{"padding": "same"}``) go
    through the model's ``check_settings`` first and its ``apply_settings`` last.
    """
    config = getattr(model, "config", None)
    if saved is not None and config is not None:
        if saved["name"] != config.name:
            raise CheckpointError(
                f"{name} holds {saved['name']} (width {saved.get('width_mult')}), not {config.name}"
            )
        bn_eps = saved.get("bn_eps", bn_eps)
    if settings:
        check = getattr(model, "check_settings", None)
        if check is None:
            shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())
            raise CheckpointError(
                f"{name} ({source} layout) needs {shown}, which a {type(model).__name__} "
                "cannot take"
            )
        check(settings, name)
    check_fits(model, state_dict, name, source)
    check_values(model, state_dict, name)
    own = model.state_dict()
    # A checkpoint without BatchNorm step counters keeps the model's own.
    missing_counters = {k: own[k] for k in own if k not in state_dict}
    model.load_state_dict({**state_dict, **missing_counters}, strict=True)
    if bn_eps is not None:
        model.set_bn_eps(bn_eps)  # type: ignore[operator]
    if settings:
        model.apply_settings(settings)  # type: ignore[operator]


def check_fits(model: nn.Module, state_dict: StateDict, name: str, source: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(own[k].shape)})"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if keys:
            parts.append(f"{len(keys)} {label}: {_shown(keys)}")
    if misshaped and all(k.startswith("classifier.") for k in misshaped):
        parts.append("only the classifier differs: pass the checkpoint's number of classes")
    # One line, however many tensors differ: the CLI prints errors as one line each.
    details = "; ".join(parts)
    raise CheckpointError(f"{name} ({source} layout) does not fit {_describe(model)}: {details}")


def check_values(model: nn.Module, state_dict: StateDict, name: str) -> None:
    """Refuse NaN/Inf, and integer or boolean tensors, where the model's tensor is floating.

    ``load_state_dict`` would copy them without a word (casting integers): the model would
    then predict NaN, and int8 calibration would fail far from the cause. Integer tensors
    of the model's own (BatchNorm's ``num_batches_tracked``) take integers as they are.
    """
    own = model.state_dict()
    not_floating, not_finite = [], []
    for key, tensor in state_dict.items():
        if key not in own or not own[key].is_floating_point():
            continue
        if not tensor.is_floating_point():
            not_floating.append(f"{key} ({str(tensor.dtype).removeprefix('torch.')})")
        elif not bool(torch.isfinite(tensor).all()):
            not_finite.append(key)
    if not (not_floating or not_finite):
        return
    parts = []
    if not_finite:
        parts.append(f"{len(not_finite)} with NaN or Inf values: {_shown(not_finite)}")
    if not_floating:
        parts.append(f"{len(not_floating)} not floating point: {_shown(not_floating)}")
    raise CheckpointError(f"{name} holds unusable tensors: {'; '.join(parts)}")


def _shown(keys: list[str]) -> str:
    """At most five names, then how many more: a message stays readable."""
    return ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")


def _describe(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    return f"{config.name} (width {config.width_mult}, {config.num_classes} classes)"
