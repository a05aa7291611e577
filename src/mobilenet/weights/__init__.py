"""Weights: read, fit and save checkpoints, knowing no task and no model family.

* :mod:`.io` reads safetensors and weights-only pickles, and writes our own safetensors
  (the model's config travels as metadata);
* :mod:`.fit` loads a state dict strictly, all or nothing, naming every mismatch and
  every tensor holding NaN, Inf or integers where the model has floating point;
* :mod:`.layouts` holds the registry of foreign layouts (torchvision, timm, ...), each
  registered by the model family it serves, and :func:`load_weights`;
* :mod:`.hub` fetches URLs into the cache (a folder per URL) with a SHA-256 check.
"""

from .fit import check_fits, check_values, fit_state_dict
from .hub import check_sha256, download, fetch, sha256_file
from .io import (
    FORMAT,
    read_checkpoint,
    read_state_dict,
    save_weights,
    saved_config,
    sealed_safetensors,
)
from .layouts import (
    Layout,
    find_layout,
    infer_num_classes,
    load_tensors,
    load_weights,
    register_layout,
)

__all__ = [
    "FORMAT",
    "Layout",
    "check_fits",
    "check_sha256",
    "check_values",
    "download",
    "fetch",
    "find_layout",
    "fit_state_dict",
    "infer_num_classes",
    "load_tensors",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "register_layout",
    "save_weights",
    "saved_config",
    "sealed_safetensors",
    "sha256_file",
]
