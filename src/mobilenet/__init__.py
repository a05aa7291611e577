"""mobilenet: the MobileNet family (V1 to V4), built as the papers describe them.

>>> import mobilenet
>>> model = mobilenet.create_model("mobilenet_v2", width_mult=0.5, num_classes=10)
>>> mobilenet.cost(model, resolution=160).madds
>>> mobilenet.create_model("mobilenet_v2", weights="mobilenet_v2.tv2_in1k").preprocess

The classifiers register on import; the detectors (``mobilenet.detection``) the first
time a detector is named, so ``import mobilenet`` needs none of the detection code.
"""

from .cost import Cost, cost
from .errors import CheckpointError, MobileNetError
from .memory import memory_efficient
from .models import MobileNet, ModelConfig, create_model, list_models
from .weights import load_weights, save_weights

__all__ = [
    "CheckpointError",
    "Cost",
    "MobileNet",
    "MobileNetError",
    "ModelConfig",
    "Preprocess",
    "cost",
    "create_model",
    "list_models",
    "load_weights",
    "memory_efficient",
    "model_preprocess",
    "save_weights",
]
__version__ = "0.1.0"

# The evaluation preprocessing (``model.preprocess`` of a model loaded with weights) and
# ``model_preprocess(model, resolution=None)``: imported on first use, since they bring
# torchvision's transforms along and ``import mobilenet`` stays light.
_LAZY = {"Preprocess": "preprocess", "model_preprocess": "published"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".data.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
