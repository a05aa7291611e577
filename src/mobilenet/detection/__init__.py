"""Object detection: SSDLite on MobileNet backbones (V2 Section 6.2, V3 Section 6.3).

Importing this package registers the detectors (``ssdlite_mobilenet_v2``,
``ssdlite_mobilenet_v3_large``, ``ssdlite_mobilenet_v3_small``) with
:func:`mobilenet.create_model`; ``list_models(task="detection")`` lists them.
"""

from . import weights  # noqa: F401  (registers the checkpoint layouts)
from .boxes import BoxCoder, DefaultBoxes, match
from .loss import LossConfig, ssd_loss
from .model import (
    DetectorConfig,
    SSDLite,
    ssdlite_mobilenet_v2,
    ssdlite_mobilenet_v3_large,
    ssdlite_mobilenet_v3_small,
)

__all__ = [
    "BoxCoder",
    "DefaultBoxes",
    "DetectorConfig",
    "LossConfig",
    "SSDLite",
    "match",
    "ssd_loss",
    "ssdlite_mobilenet_v2",
    "ssdlite_mobilenet_v3_large",
    "ssdlite_mobilenet_v3_small",
]
