"""Semantic segmentation: LR-ASPP (V3 Section 6.4) and mobile DeepLabv3 (V2 Section 6.3)
on atrous MobileNet backbones.

Importing this package registers the models (``lraspp_mobilenet_v3_large``,
``lraspp_mobilenet_v3_small``, ``deeplabv3_mobilenet_v3_large``,
``deeplabv3_mobilenet_v2``) with :func:`mobilenet.create_model`;
``list_models(task="segmentation")`` lists them.
"""

from . import weights  # noqa: F401  (registers the checkpoint layouts)
from .heads import ASPP, DeepLabHead, FCNHead, LRASPPHead
from .model import (
    SegmentationModel,
    SegmenterConfig,
    deeplabv3_mobilenet_v2,
    deeplabv3_mobilenet_v3_large,
    lraspp_mobilenet_v3_large,
    lraspp_mobilenet_v3_small,
)

__all__ = [
    "ASPP",
    "DeepLabHead",
    "FCNHead",
    "LRASPPHead",
    "SegmentationModel",
    "SegmenterConfig",
    "deeplabv3_mobilenet_v2",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
    "lraspp_mobilenet_v3_small",
]
