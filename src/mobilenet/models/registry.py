"""Models registered by name: ``create_model("mobilenet_v2", width_mult=0.5)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from ..errors import MobileNetError
from .base import MobileNet

__all__ = [
    "check_width_mult",
    "create_model",
    "list_models",
    "model_from_checkpoint",
    "model_task",
    "register_model",
]

_REGISTRY: dict[str, Callable[..., Any]] = {}
_TASKS: dict[str, str] = {}  # model name -> "classification" or "detection"

F = TypeVar("F", bound=Callable[..., nn.Module])


@overload
def register_model(fn: F) -> F: ...
@overload
def register_model(*, task: str = "classification") -> Callable[[F], F]: ...
def register_model(fn: F | None = None, *, task: str = "classification") -> F | Callable[[F], F]:
    """Register a model builder under its function name: ``@register_model`` for a
    classifier, ``@register_model(task="detection")`` for a detector."""

    def register(fn: F) -> F:
        _REGISTRY[fn.__name__] = fn
        _TASKS[fn.__name__] = task
        return fn

    return register(fn) if fn is not None else register


def list_models(task: str | None = "classification") -> list[str]:
    """Names of the registered models of ``task`` (None: every task), in registration
    order: classifiers V1, V2, V3; detectors SSDLite on V2, V3-Large, V3-Small."""
    return [name for name in _REGISTRY if task is None or _TASKS[name] == task]


def model_task(name: str) -> str:
    """``"classification"`` or ``"detection"``."""
    return _TASKS[name]


def check_width_mult(width_mult: float) -> float:
    if not isinstance(width_mult, (int, float)) or not width_mult > 0:
        raise MobileNetError(f"width multiplier must be a positive number, got {width_mult!r}")
    return float(width_mult)


def create_model(name: str, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model: a :class:`MobileNet` classifier, or an SSDLite detector
    for the names of ``list_models(task="detection")``.

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
    if _TASKS[name] == "detection":
        from ..detection.weights import detector_from_checkpoint

        return detector_from_checkpoint(name, state_dict, metadata, str(path), **kwargs)
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
