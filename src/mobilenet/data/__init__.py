"""Data: image folders, built-in offline datasets, and their transforms."""

from .datasets import BUILTIN, ImageFolder, Split, TensorImages, builtin_splits, folder_splits
from .images import check_headers, find_broken, header_problem, load_rgb, to_rgb
from .transforms import Augment, eval_transform, train_transform

__all__ = [
    "BUILTIN",
    "Augment",
    "ImageFolder",
    "Split",
    "TensorImages",
    "builtin_splits",
    "check_headers",
    "eval_transform",
    "find_broken",
    "folder_splits",
    "header_problem",
    "load_rgb",
    "to_rgb",
    "train_transform",
]
