"""Training: recipes, the TF-style RMSProp, the loop, evaluation, distributed runs."""

from .evaluate import evaluate
from .loop import TrainConfig, TrainingDiverged, train
from .optim import RMSpropTF
from .recipes import RECIPES, Recipe, get_recipe

__all__ = [
    "RECIPES",
    "RMSpropTF",
    "Recipe",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "get_recipe",
    "train",
]
