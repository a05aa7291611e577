"""Deployment: inference preparation and export."""

from .onnx import export_onnx, export_torchscript, onnx_session
from .prepare import fold_batchnorm, prepare_for_inference

__all__ = [
    "export_onnx",
    "export_torchscript",
    "fold_batchnorm",
    "onnx_session",
    "prepare_for_inference",
]
