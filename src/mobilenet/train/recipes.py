"""Training recipes as data: each default cites where it comes from.

A recipe is a frozen dataclass; command-line flags override fields with
``dataclasses.replace`` and the resolved recipe is saved with the run (``config.json``).
Learning rates are given for a reference global batch (``lr_batch``) and scaled linearly
to the batch actually used (Goyal et al., 2017), unless ``--lr`` sets the rate itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ..data.transforms import Augment
from ..errors import MobileNetError

__all__ = ["RECIPES", "Recipe", "dense_recipe", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int  # global batch (all processes together)
    optimizer: str  # "rmsprop_tf" | "sgd" (Nesterov) | "adamw"
    lr: float  # for a global batch of lr_batch images
    lr_batch: int
    momentum: float = 0.9
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW's (beta1, beta2): PyTorch's
    adam_eps: float = 1e-8
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1e-3
    weight_decay: float = 0.0
    norm_weight_decay: bool = True  # also decay BatchNorm weights and biases?
    schedule: str = "exponential"  # "exponential" (staircase) | "cosine"
    decay_rate: float = 1.0  # exponential: x decay_rate ...
    decay_epochs: float = 1.0  # ... every decay_epochs
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine: final lr / initial lr
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    dropout: float | None = None  # None keeps the model's default
    bn_momentum: float | None = None  # None keeps the model's default (TF's 0.99 decay)
    resolution: int = 224
    augment: Augment = field(default_factory=Augment)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scaled_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / self.lr_batch


# MobileNetV4-Conv-S on ImageNet-1k. The paper points to the authors' released code
# (V4 footnote 1, TF model garden); its training config for Conv-S
# (official/vision/configs/experiments/image_classification/
# imagenet_mobilenetv4_conv_small_tpu.yaml, "Top-1 Acc: 73.8%", the paper's figure)
# gives every default here: AdamW (beta1 0.6, epsilon 1e-6, decoupled weight decay
# 0.01, none on BatchNorm), learning rate 0.002 for a global batch of 4096, linear
# warm-up over 1,560 steps (5 epochs of 312.8 steps) then cosine decay to zero over
# 3,002,368 steps (9,600 epochs), label smoothing 0.1, dropout 0.3, BatchNorm momentum
# 0.95 (TF's decay: PyTorch's 0.05), weight EMA 0.9999, and RandAugment (magnitude 9,
# Cutout excluded) on the Inception crop. Not carried over: the config's extra L2 loss
# term (1e-5) next to AdamW's decay, and its per-op apply probability 0.5 (torchvision's
# RandAugment applies both of its ops).
_MOBILENET_V4 = Recipe(
    name="mobilenet_v4",
    epochs=9600,
    batch_size=4096,
    optimizer="adamw",
    lr=0.002,
    lr_batch=4096,
    adam_betas=(0.6, 0.999),
    adam_eps=1e-6,
    weight_decay=0.01,
    norm_weight_decay=False,
    schedule="cosine",
    warmup_epochs=5,
    label_smoothing=0.1,
    ema_decay=0.9999,
    dropout=0.3,
    bn_momentum=0.05,
    augment=Augment(auto_augment="randaugment"),
)

RECIPES: dict[str, Recipe] = {
    # V2 Section 6.1: "RMSPropOptimizer with both decay and momentum set to 0.9 ... weight
    # decay 0.00004 ... initial learning rate of 0.045, and learning rate decay rate of
    # 0.98 per epoch ... 16 GPU asynchronous workers, and a batch size of 96" (so 0.045 is
    # the rate for 96 images). Label smoothing 0.1 and the weight EMA (decay 0.9999) are
    # those of the TF-Slim training setup the paper used (Szegedy et al., 2016). V1 was
    # trained the same way (V1 Section 4: RMSprop, asynchronous, little regularisation).
    "paper-v2": Recipe(
        name="paper-v2",
        epochs=300,
        batch_size=96,
        optimizer="rmsprop_tf",
        lr=0.045,
        lr_batch=96,
        weight_decay=4e-5,
        schedule="exponential",
        decay_rate=0.98,
        decay_epochs=1.0,
        label_smoothing=0.1,
        ema_decay=0.9999,
    ),
    # V3 Section 6.1: "RMSPropOptimizer with 0.9 momentum ... initial learning rate of 0.1,
    # with batch size 4096 (128 images per chip), and learning rate decay rate of 0.01 every
    # 3 epochs. We use dropout of 0.8, and l2 weight decay 1e-5 ... exponential moving
    # average with decay 0.9999". Dropout 0.8 there is the keep probability: 0.2 here.
    "paper-v3": Recipe(
        name="paper-v3",
        epochs=300,
        batch_size=128,
        optimizer="rmsprop_tf",
        lr=0.1,
        lr_batch=4096,
        weight_decay=1e-5,
        schedule="exponential",
        decay_rate=0.99,
        decay_epochs=3.0,
        dropout=0.2,
        ema_decay=0.9999,
    ),
    # torchvision's current classification recipe ("How to train state-of-the-art models
    # using TorchVision's latest primitives", 2021): SGD lr 0.5 for batch 1024, cosine with
    # 5 linear warm-up epochs, label smoothing 0.1, TrivialAugment, random erasing 0.1,
    # weight decay 2e-5 with none on norm layers, EMA of the weights, 600 epochs.
    "modern": Recipe(
        name="modern",
        epochs=600,
        batch_size=128,
        optimizer="sgd",
        lr=0.5,
        lr_batch=1024,
        weight_decay=2e-5,
        norm_weight_decay=False,
        schedule="cosine",
        warmup_epochs=5,
        label_smoothing=0.1,
        ema_decay=0.99998,
        augment=Augment(auto_augment="trivialaugment", random_erasing=0.1),
    ),
    # Fastest to the demo target on the built-in MNIST (>= 97% top-1 on 1,000 held-out
    # digits in minutes on 2 CPU cores): AdamW with a short warm-up and cosine decay,
    # faster BatchNorm statistics for a short run, and no horizontal flip (digits are
    # not mirror-symmetric).
    "demo": Recipe(
        name="demo",
        epochs=8,
        batch_size=64,
        optimizer="adamw",
        lr=2e-3,
        lr_batch=64,
        weight_decay=0.05,
        norm_weight_decay=False,
        schedule="cosine",
        warmup_epochs=1,
        label_smoothing=0.1,
        dropout=0.1,
        bn_momentum=0.1,
        resolution=48,
        augment=Augment(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), hflip=0.0),
    ),
    "mobilenet_v4": _MOBILENET_V4,  # above
    # The mobilenet_v4 recipe scaled down to the built-in MNIST (4,000 training digits,
    # >= 97% top-1 on the 1,000 held out, minutes on 2 CPU cores), as `demo` scales the
    # modern recipe: the optimizer (AdamW, beta1 0.6, epsilon 1e-6), weight decay 0.01 off
    # BatchNorm, label smoothing 0.1, dropout 0.3 and the warm-up + cosine shape are V4's;
    # what a few hundred steps need instead: 12 epochs with 1 warm-up epoch, the peak rate
    # 0.002 at batch 64 (not scaled down from 4096: Adam's steps do not grow with the
    # batch), faster BatchNorm statistics (0.1), no EMA (0.9999 averages over 10,000
    # steps, more than the run), 48-pixel inputs, and the demo's mild crop without flips
    # or RandAugment (digits are not mirror-symmetric; strong augmentation pays off over
    # thousands of epochs, not 12).
    "mobilenet_v4-demo": replace(
        _MOBILENET_V4,
        name="mobilenet_v4-demo",
        epochs=12,
        batch_size=64,
        lr_batch=64,
        warmup_epochs=1,
        ema_decay=None,
        bn_momentum=0.1,
        resolution=48,
        augment=Augment(crop_scale=(0.7, 1.0), crop_ratio=(0.9, 1.1), hflip=0.0),
    ),
}


def get_recipe(name: str, **overrides: Any) -> Recipe:
    """A named recipe with some fields replaced (``None`` values are ignored)."""
    if name not in RECIPES:
        raise MobileNetError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}")
    names = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise MobileNetError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def dense_recipe(
    name: str, config: Any, default_lr: dict[str, float], resolution: int, **extra: Any
) -> Recipe:
    """The recipe of a detection or segmentation run (``config`` holds its ``epochs``,
    ``batch_size``, ``optimizer``, ``lr``, ``weight_decay``, ``warmup_epochs`` and
    ``ema_decay``): the learning rate given for the batch used (``default_lr`` of the
    optimizer when ``lr`` is None), cosine schedule, no weight decay on norms."""
    lr = config.lr if config.lr is not None else default_lr.get(config.optimizer, 0.0)
    return Recipe(
        name=name,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        lr=lr,
        lr_batch=config.batch_size,
        weight_decay=config.weight_decay,
        norm_weight_decay=False,
        schedule="cosine",
        warmup_epochs=config.warmup_epochs,
        ema_decay=config.ema_decay,
        resolution=resolution,
        **extra,
    )
