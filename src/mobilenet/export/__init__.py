"""Deployment: inference preparation and export (ONNX, torch.export, TorchScript)."""

from .onnx import export_onnx, export_torchscript, onnx_session
from .prepare import fold_batchnorm, prepare_for_inference
from .pt2 import export_pt2, read_pt2

__all__ = [
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "fold_batchnorm",
    "onnx_session",
    "prepare_for_inference",
    "read_pt2",
]
