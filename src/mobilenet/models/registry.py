"""Models registered by name: ``create_model("mobilenet_v2", width_mult=0.5)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import MobileNetError
from .base import MobileNet

__all__ = [
    "check_width_mult",
    "create_model",
    "list_models",
    "model_from_checkpoint",
    "register_model",
]

_REGISTRY: dict[str, Callable[..., MobileNet]] = {}

F = TypeVar("F", bound=Callable[..., MobileNet])


def register_model(fn: F) -> F:
    """Register a model builder under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, in registration order (V1, V2, V3)."""
    return list(_REGISTRY)


def check_width_mult(width_mult: float) -> float:
    if not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise MobileNetError(f"width multiplier must be a positive number, got {width_mult!r}")
    return float(width_mult)


def create_model(name: str, weights: str | None = None, **kwargs: Any) -> MobileNet:
    """Build a registered model.

    Args:
        name: one of :func:`list_models`.
        weights: optional checkpoint to load: a local path (any format
            :func:`mobilenet.load_weights` accepts), a URL, or the name of an official
            checkpoint (see :func:`mobilenet.weights.list_pretrained`). When given and
            ``num_classes`` is not, the number of classes is taken from the checkpoint.
        **kwargs: ``width_mult``, ``num_classes``, ``dropout``.
    """
    if name not in _REGISTRY:
        known = ", ".join(_REGISTRY)
        raise MobileNetError(f"unknown model {name!r}; known models: {known}")
    if "width_mult" in kwargs:
        kwargs["width_mult"] = check_width_mult(kwargs["width_mult"])
    num_classes = kwargs.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
        raise MobileNetError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if weights is None:
        return _REGISTRY[name](**kwargs)
    from ..weights import read_checkpoint, resolve_weights

    path = resolve_weights(weights)
    state_dict, metadata = read_checkpoint(path)
    return model_from_checkpoint(name, state_dict, metadata, str(path), **kwargs)


def model_from_checkpoint(
    name: str,
    state_dict: dict[str, Any],
    metadata: dict[str, str],
    source_name: str = "checkpoint",
    **kwargs: Any,
) -> MobileNet:
    """Build ``name`` to fit a checkpoint already read, and load it.

    Our own files supply width, dropout and classes as defaults; for other checkpoints
    the number of classes is read from the classifier. ``kwargs`` override both.
    """
    from ..weights import infer_num_classes, load_weights, saved_config

    saved = saved_config(metadata)
    if saved is not None and saved.name == name:  # our own file: its config is the default
        kwargs = {"width_mult": saved.width_mult, "dropout": saved.dropout, **kwargs}
    kwargs.setdefault("num_classes", infer_num_classes(state_dict))
    model = create_model(name, **kwargs)
    load_weights(model, state_dict, source_name=source_name, metadata=metadata)
    return model
