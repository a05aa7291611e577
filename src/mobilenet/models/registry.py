"""Models registered by name: ``create_model("mobilenet_v2", width_mult=0.5)``.

Each name knows its task (``classification``, ``detection``, ...), so one command serves
every model. The classifiers register when :mod:`mobilenet.models` is imported; the
families of other tasks register when first asked for (``_TASK_PACKAGES``), so
``import mobilenet`` stays light.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from torch import nn

from ..errors import MobileNetError
from ..weights import find_layout, load_tensors, read_checkpoint, saved_config
from ..weights.layouts import with_origin
from .base import MobileNet

__all__ = [
    "TASKS",
    "check_width_mult",
    "checkpoint_task",
    "create_model",
    "list_models",
    "model_from_checkpoint",
    "model_task",
    "register_model",
]

TASKS = ("classification", "detection", "segmentation", "encoder")
# The package that registers each task's models beyond the classifiers, imported on demand.
_TASK_PACKAGES = {"detection": "mobilenet.detection", "segmentation": "mobilenet.segmentation"}

# 100x the papers' widest network (1.4) is already 10,000x its weights; beyond, a model is
# a typo, not an experiment.
MAX_WIDTH_MULT = 100.0

_REGISTRY: dict[str, Callable[..., Any]] = {}
_TASKS: dict[str, str] = {}  # model name -> task

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


def _load(task: str | None = None) -> None:
    """Import the packages that register ``task``'s models (None: every task's)."""
    for name, package in _TASK_PACKAGES.items():
        if task is None or task == name:
            importlib.import_module(package)


TASK_ORDER = ("classification", "detection", "segmentation", "encoder")


def list_models(task: str | None = "classification") -> list[str]:
    """Names of the registered models of ``task`` (None: every task), in registration
    order: classifiers V1, V2, V3; detectors SSDLite on V2, V3-Large, V3-Small;
    segmentation models LR-ASPP and DeepLabv3."""
    _load(task)  # the classifiers are registered already
    names = [name for name in _REGISTRY if task is None or _TASKS[name] == task]
    # By task first: the families register when first imported, in whatever order.
    order = {kind: i for i, kind in enumerate(TASK_ORDER)}
    return sorted(names, key=lambda name: order.get(_TASKS[name], len(order)))


def model_task(name: str) -> str:
    """The task of a registered model: ``"classification"``, ``"detection"``,
    ``"segmentation"``, ``"encoder"`` (features, no classes: MobileNetV5's)."""
    if name not in _REGISTRY:
        _load()
    if name not in _REGISTRY:
        raise MobileNetError(f"unknown model {name!r}; known models: {', '.join(_REGISTRY)}")
    return _TASKS[name]


def check_width_mult(width_mult: float) -> float:
    """A width multiplier alpha: a finite number in (0, MAX_WIDTH_MULT]. Beyond the bound
    the channel counts alone (hundreds of thousands) make a model that cannot be built,
    and a NaN or infinite width would fail deep inside a layer's constructor."""
    if (
        not isinstance(width_mult, (int, float))
        or isinstance(width_mult, bool)
        or not math.isfinite(width_mult)
        or not 0 < width_mult <= MAX_WIDTH_MULT
    ):
        raise MobileNetError(
            f"width multiplier must be a finite number > 0 and <= {MAX_WIDTH_MULT:g}, "
            f"got {width_mult!r}"
        )
    return float(width_mult)


def _check_num_classes(num_classes: Any) -> None:
    if num_classes is not None and (
        not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0
    ):
        raise MobileNetError(f"num_classes must be a non-negative integer, got {num_classes!r}")


def create_model(
    name: str,
    weights: str | Path | None = None,
    sha256: str | None = None,
    origin: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model: a classifier, or a model of another task (see
    :func:`list_models` with ``task=None``).

    Args:
        name: a registered model name.
        weights: optional checkpoint to load: a local path (any format
            :func:`mobilenet.load_weights` accepts), a URL, or the key of an official
            checkpoint (see :func:`mobilenet.models.pretrained.list_pretrained`). When given
            and ``num_classes`` is not, the number of classes is taken from the checkpoint.
        sha256: the expected SHA-256 (or a prefix of it) of a URL's file.
        origin: what a foreign checkpoint was trained as, where its tensors cannot tell
            (``"timm:tf_mobilenetv3_large_075"``); see :func:`mobilenet.load_weights`.
        **kwargs: the builder's options: ``width_mult``, ``num_classes``, ``dropout``,
            ``drop_path_rate`` (stochastic depth of the classifiers' residual blocks, in
            [0, 1)), ``output_stride`` (8, 16 or 32: an atrous backbone), ``padding``
            ("symmetric" or "same": TensorFlow's), ``keras`` (Keras' build), ``aux_loss``, ...
    """
    model_task(name)  # registers the model's family, or refuses an unknown name
    if "width_mult" in kwargs:
        kwargs["width_mult"] = check_width_mult(kwargs["width_mult"])
    _check_num_classes(kwargs.get("num_classes"))
    if weights is None:
        return _build(name, kwargs)
    from .pretrained import resolve_weights

    path = resolve_weights(weights, sha256, model=name)
    state_dict, metadata = read_checkpoint(path)
    return model_from_checkpoint(name, state_dict, metadata, str(path), origin, **kwargs)


def _build(name: str, kwargs: dict[str, Any]) -> nn.Module:
    builder = _REGISTRY[name]
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        raise MobileNetError(f"{name}: {e}") from None
    return builder(**kwargs)


def model_from_checkpoint(
    name: str,
    state_dict: dict[str, torch.Tensor],
    metadata: Mapping[str, str],
    source_name: str = "checkpoint",
    origin: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` to fit a checkpoint already read, and load it.

    Our own files supply their saved config (width, classes, dropout, a detector's input
    size ...) as defaults; for other checkpoints the number of classes is read from the
    classifier, and the settings the checkpoint needs (TF padding, Keras' build) from its
    layout (and ``origin``, see :func:`mobilenet.load_weights`). ``kwargs`` override both.

    The saved config is checked like the builder's arguments, and the model is sized on
    the ``meta`` device before it is built: a file whose config asks for an absurd model
    (an infinite width, a billion classes) is refused in one line, not by the allocator.
    """
    model_task(name)
    saved = saved_config(metadata)
    if saved is not None and saved["name"] == name:  # our own file: its config is the default
        accepted = _options(_REGISTRY[name])
        defaults = {
            k: tuple(v) if isinstance(v, list) else v  # JSON keeps tuples as lists
            for k, v in saved.items()
            if k not in ("name", "bn_eps") and (accepted is None or k in accepted)
        }
        try:
            if "width_mult" in defaults and "width_mult" not in kwargs:
                check_width_mult(defaults["width_mult"])
            if "num_classes" not in kwargs:
                _check_num_classes(defaults.get("num_classes"))
        except MobileNetError as e:
            raise MobileNetError(f"{source_name}: its saved config is invalid: {e}") from None
        kwargs = {**defaults, **kwargs}
    if "width_mult" in kwargs:
        kwargs["width_mult"] = check_width_mult(kwargs["width_mult"])
    _check_num_classes(kwargs.get("num_classes"))
    metadata = with_origin(metadata, origin)
    layout = find_layout(state_dict)
    kwargs.setdefault("num_classes", layout.num_classes(state_dict))
    accepted = _options(_REGISTRY[name])
    settings = layout.settings(state_dict, metadata, source_name)
    for key, value in settings.items():
        if key not in ("bn_eps", "preprocess") and (accepted is None or key in accepted):
            kwargs.setdefault(key, value)  # built as the checkpoint needs
    try:
        _check_fits(name, kwargs)
    except MobileNetError as e:
        raise MobileNetError(f"{source_name}: {e}") from None
    model = _build(name, kwargs)
    loaded = load_tensors(model, state_dict, metadata, source_name)
    if isinstance(model, MobileNet):  # a classifier
        from ..data.published import attach_preprocess

        # The preprocessing the weights were evaluated with: ``model.preprocess``.
        attach_preprocess(model, metadata, source_name, loaded, settings.get("preprocess"))
    return model


def _check_fits(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse a model whose weights cannot fit in memory, before building it for real.

    The model is built on the meta device (shapes, no data, instantly); a model larger
    than the checkpoint could not load it anyway, but a merely mis-shaped one is left to
    :func:`load_weights`, whose message says which tensors differ.
    """
    from ..machine import available_memory, format_bytes

    with torch.device("meta"):
        meta = _build(name, kwargs)
    tensors = [*meta.parameters(), *meta.buffers()]
    need = sum(t.numel() * t.element_size() for t in tensors)
    available = available_memory()
    if available is not None and need > available:
        raise MobileNetError(
            f"{name} with {_describe(kwargs)} would need "
            f"{format_bytes(need)} for its weights, more than the {format_bytes(available)} "
            "available"
        )


def _describe(kwargs: Mapping[str, Any]) -> str:
    shown = {k: kwargs[k] for k in ("width_mult", "num_classes", "image_size") if k in kwargs}
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "its default options"


def _options(builder: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments a builder takes (None: any, through ``**kwargs``)."""
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters}


def checkpoint_task(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """The task of the model a checkpoint holds: from our own files' config, else from the
    layout its tensors are written in."""
    saved = saved_config(metadata)
    if saved is not None:
        return model_task(saved["name"])
    _load()
    return getattr(find_layout(state_dict).family, "task", "classification")
