"""The MobileNet model zoo. Importing this package registers every model."""

from . import mobilenet_v1, mobilenet_v2, mobilenet_v3  # noqa: F401  (registration)
from .base import EvalConfig, FeatureInfo, MobileNet, ModelConfig
from .registry import create_model, list_models, register_model

__all__ = [
    "EvalConfig",
    "FeatureInfo",
    "MobileNet",
    "ModelConfig",
    "create_model",
    "list_models",
    "register_model",
]
