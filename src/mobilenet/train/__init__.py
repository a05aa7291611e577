"""Training: the engine every task runs on, recipes, optimizers, distributed runs.

The tasks themselves (what to train) live in their packages: :mod:`mobilenet.classification.task`,
:mod:`mobilenet.detection.task`, :mod:`mobilenet.segmentation.task`.
"""

from .engine import FitResult, RunConfig, Setup, Task, TrainingDiverged, fit
from .evaluate import evaluate
from .optim import RMSpropTF
from .recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "RECIPES",
    "FitResult",
    "RMSpropTF",
    "Recipe",
    "RunConfig",
    "Setup",
    "Task",
    "TrainingDiverged",
    "evaluate",
    "fit",
    "get_recipe",
]
