"""The MobileNet model zoo. Importing this package registers every classifier and the
checkpoint layouts they read (torchvision, timm, Keras, ours)."""

from . import (  # noqa: F401  (registration)
    keras_layouts,
    layouts,
    mobilenet_v1,
    mobilenet_v2,
    mobilenet_v3,
    mobilenet_v4,
    mobilenet_v5,
    v4_layouts,
    v5_layouts,
)
from .base import EvalConfig, FeatureInfo, MobileNet, ModelConfig
from .pretrained import PRETRAINED, list_pretrained
from .registry import (
    checkpoint_task,
    create_model,
    list_models,
    model_from_checkpoint,
    model_task,
    register_model,
)

__all__ = [
    "PRETRAINED",
    "EvalConfig",
    "FeatureInfo",
    "MobileNet",
    "ModelConfig",
    "checkpoint_task",
    "create_model",
    "list_models",
    "list_pretrained",
    "model_from_checkpoint",
    "model_task",
    "register_model",
]
