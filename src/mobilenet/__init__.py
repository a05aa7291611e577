"""mobilenet: the MobileNet family (V1, V2, V3), built as the papers describe them.

>>> import mobilenet
>>> model = mobilenet.create_model("mobilenet_v2", width_mult=0.5, num_classes=10)
>>> mobilenet.cost(model, resolution=160).madds

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
    "cost",
    "create_model",
    "list_models",
    "load_weights",
    "memory_efficient",
    "save_weights",
]
__version__ = "0.1.0"
