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

__all__ = [
    "MOBILENET_V4_RECIPES",
    "RECIPES",
    "Recipe",
    "dense_recipe",
    "get_recipe",
    "resolve_recipe",
]


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
    # Batch mixing (torchvision.transforms.v2 MixUp and CutMix): Beta(alpha, alpha); 0 off.
    mixup: float = 0.0
    cutmix: float = 0.0
    mix_prob: float = 1.0  # share of batches mixed
    switch_prob: float = 0.5  # with both on: share of mixed batches that use CutMix
    drop_path: float = 0.0  # stochastic depth of the last residual block (less before it)
    aug_repeats: int = 1  # repeated augmentation: each image K times per epoch
    layer_decay: float | None = None  # layer-wise lr decay (fine-tuning): lr x d**depth
    kd_alpha: float = 0.5  # with a teacher: the share of the distillation loss
    kd_temperature: float = 1.0  # with a teacher: softmax temperature of both
    bn_eps: float | None = None  # None keeps the model's default (TF's 1e-3)
    drop_path_flat: bool = False  # True: every residual block drops at drop_path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scaled_lr(self, batch_size: int) -> float:
        return self.lr * batch_size / self.lr_batch


# MobileNetV4 on ImageNet-1k, one recipe per model. The paper points to the authors'
# released code (V4 footnote 1, the TF Model Garden); each recipe below follows its training
# config, official/vision/configs/experiments/image_classification/
# imagenet_mobilenetv4_<model>_tpu.yaml, and each value names the key it comes from. How
# the keys map (a key a config leaves out takes Model Garden's default, named as such):
# - trainer.optimizer_config.optimizer.adamw: beta_1 and epsilon -> adam_betas and adam_eps
#   (defaults 0.9, beta_2 0.999, epsilon 1e-7: AdamWeightDecayConfig in
#   official/modeling/optimization/configs/optimizer_config.py); weight_decay_rate ->
#   weight_decay (decoupled and scaled by the rate, as PyTorch's AdamW);
#   exclude_from_weight_decay ['batch_normalization'] -> norm_weight_decay False.
# - learning_rate.cosine.initial_learning_rate is the rate for train_data.global_batch_size:
#   lr, lr_batch and batch_size; cosine alpha (default 0) -> min_lr_ratio.
# - warmup.linear.warmup_steps and trainer.train_steps -> warmup_epochs and epochs, counted
#   in epochs of 1,281,167 // global batch steps (312 at 4096, 78 at 16384): Model Garden's
#   own steps per epoch (IMAGENET_TRAIN_EXAMPLES // train_batch_size in
#   official/vision/configs/image_classification.py; the Conv-L config says so next to
#   steps_per_loop) and the engine's, which drops the last partial batch. So 1,560 warm-up
#   steps are 5 epochs at 4096 and 20 at 16384.
# - model.norm_activation: norm_momentum (TF's decay d) -> bn_momentum 1 - d; norm_epsilon
#   (default 0.001) -> bn_eps. model.dropout_rate -> dropout.
# - backbone.mobilenet.stochastic_depth_drop_rate (default 0) -> drop_path, reached by the
#   last block (block i of n drops rate * i / n) unless flat_stochastic_depth_drop_rate,
#   which gives every block the rate -> drop_path_flat.
# - losses.label_smoothing -> label_smoothing; with soft_labels the loss takes the mixing's
#   targets, smoothed by mixup_and_cutmix.label_smoothing (default 0.1): the same 0.1.
# - model.input_size -> resolution. train_data.aug_type randaug -> RandAugment after the
#   Inception crop and flips (DataConfig's aug_crop, crop_area_range (0.08, 1) and
#   aug_rand_hflip defaults); no random erasing (random_erasing unset).
# - train_data.mixup_and_cutmix: mixup_alpha, cutmix_alpha, prob, switch_prob -> mixup,
#   cutmix, mix_prob, switch_prob (defaults 0.8, 1.0, 1.0, 0.5 in common.MixupAndCutmix).
#   Model Garden's sampler before its fix (tensorflow/models#13490, January 2025) drew the
#   weight from Uniform(0, 1) whatever the alpha; the configs' alphas are kept.
# - optimizer_config.ema.average_decay -> ema_decay; no ema key: no EMA.
# Not carried over by any of them: RandAugment's magnitude (9 for Conv-S, 15 for the others,
# on Model Garden's scale of 10 levels; Augment's RandAugment is torchvision's, 2 ops at
# bin 9 of 31: Rotate 9 degrees where Model Garden's level 9 turns 27), prob_to_apply (each
# op applied with that probability; torchvision applies both), cutout_const,
# translate_const and magnitude_std; Model Garden's MixUp/CutMix weight, drawn per image
# (torchvision draws one per batch); the cosine counted from step 0 under the warm-up (here
# from the warm-up's end: the same last step, a rate at most 0.4% higher just after the
# warm-up); gradient_clip_norm 0.0 (off, as here); the runtime and data-pipeline keys
# (TPU, bfloat16, 1001 classes with background, input paths, intervals). No distillation config
# for MobileNetV4 (a *distill* file) was found next to these, so the Hybrid-L recipe is the
# plain one and leaves kd_alpha and kd_temperature at their defaults.

# Conv-S: imagenet_mobilenetv4_conv_small_tpu.yaml ("Top-1 Acc: 73.8% @ ~9623 epochs", the
# paper's figure). Also not carried over: its L2 loss term next to AdamW's decay
# (losses.l2_weight_decay 1e-5) and its EMA's start (ema.start_step 1560, dynamic_decay
# false: the EMA here warms up from the first step, as TF's dynamic decay).
_MOBILENET_V4 = Recipe(
    name="mobilenet_v4",
    epochs=9623,  # train_steps 3,002,368 / 312
    batch_size=4096,  # train_data.global_batch_size
    optimizer="adamw",  # optimizer.type
    lr=0.002,  # cosine.initial_learning_rate
    lr_batch=4096,  # train_data.global_batch_size
    adam_betas=(0.6, 0.999),  # adamw.beta_1 (beta_2 default)
    adam_eps=1e-6,  # adamw.epsilon
    weight_decay=0.01,  # adamw.weight_decay_rate
    norm_weight_decay=False,  # adamw.exclude_from_weight_decay
    schedule="cosine",  # learning_rate.type
    warmup_epochs=5,  # warmup.linear.warmup_steps 1560 / 312
    min_lr_ratio=0.0,  # cosine.alpha (default)
    label_smoothing=0.1,  # losses.label_smoothing
    ema_decay=0.9999,  # ema.average_decay
    dropout=0.3,  # model.dropout_rate
    bn_momentum=0.05,  # norm_activation.norm_momentum 0.95
    resolution=224,  # model.input_size
    augment=Augment(auto_augment="randaugment"),  # aug_type randaug (not its magnitude 9)
    drop_path=0.0,  # stochastic_depth_drop_rate (default)
    bn_eps=1e-6,  # norm_activation.norm_epsilon
)

# Conv-M: imagenet_mobilenetv4_conv_medium_tpu.yaml ("Top-1 Acc: 79.9% @ 500 epochs").
_MOBILENET_V4_CONV_MEDIUM = Recipe(
    name="mobilenet_v4_conv_medium",
    epochs=500,  # train_steps 156,000 / 312
    batch_size=4096,  # train_data.global_batch_size
    optimizer="adamw",  # optimizer.type
    lr=0.004,  # cosine.initial_learning_rate
    lr_batch=4096,  # train_data.global_batch_size
    adam_betas=(0.9, 0.999),  # adamw beta_1, beta_2 (defaults)
    adam_eps=1e-7,  # adamw.epsilon (default)
    weight_decay=0.1,  # adamw.weight_decay_rate
    norm_weight_decay=False,  # adamw.exclude_from_weight_decay
    schedule="cosine",  # learning_rate.type
    warmup_epochs=5,  # warmup.linear.warmup_steps 1560 / 312
    min_lr_ratio=0.0,  # cosine.alpha (default)
    label_smoothing=0.1,  # losses.label_smoothing
    ema_decay=None,  # no ema key
    dropout=0.2,  # model.dropout_rate
    bn_momentum=0.003,  # norm_activation.norm_momentum 0.997
    resolution=256,  # model.input_size
    augment=Augment(auto_augment="randaugment"),  # aug_type randaug (not its magnitude 15)
    drop_path=0.075,  # stochastic_depth_drop_rate
    drop_path_flat=False,  # flat_stochastic_depth_drop_rate
    bn_eps=1e-3,  # norm_activation.norm_epsilon
)

# Conv-L: imagenet_mobilenetv4_conv_large_tpu.yaml ("Top-1 Acc: 82.92% @ 500 epoches").
_MOBILENET_V4_CONV_LARGE = Recipe(
    name="mobilenet_v4_conv_large",
    epochs=500,  # train_steps 39,000 / 78 ("# 500 epochs")
    batch_size=16384,  # train_data.global_batch_size
    optimizer="adamw",  # optimizer.type
    lr=0.004,  # cosine.initial_learning_rate
    lr_batch=16384,  # train_data.global_batch_size
    adam_betas=(0.9, 0.999),  # adamw beta_1, beta_2 (defaults)
    adam_eps=1e-7,  # adamw.epsilon (default)
    weight_decay=0.2,  # adamw.weight_decay_rate
    norm_weight_decay=False,  # adamw.exclude_from_weight_decay
    schedule="cosine",  # learning_rate.type
    warmup_epochs=20,  # warmup.linear.warmup_steps 1560 / 78
    min_lr_ratio=0.0,  # cosine.alpha (default)
    label_smoothing=0.1,  # losses.label_smoothing, mixup_and_cutmix.label_smoothing
    ema_decay=None,  # no ema key
    dropout=0.2,  # model.dropout_rate
    bn_momentum=0.003,  # norm_activation.norm_momentum 0.997
    resolution=384,  # model.input_size
    augment=Augment(auto_augment="randaugment"),  # aug_type randaug (not its magnitude 15)
    mixup=0.8,  # mixup_and_cutmix.mixup_alpha
    cutmix=1.0,  # mixup_and_cutmix.cutmix_alpha
    mix_prob=0.2,  # mixup_and_cutmix.prob
    switch_prob=0.5,  # mixup_and_cutmix.switch_prob
    drop_path=0.2,  # stochastic_depth_drop_rate
    drop_path_flat=True,  # flat_stochastic_depth_drop_rate
    bn_eps=1e-3,  # norm_activation.norm_epsilon
)

# Hybrid-M: imagenet_mobilenetv4_hybrid_medium_tpu.yaml ("Top-1 Acc: 80.7% @ 500 epochs").
_MOBILENET_V4_HYBRID_MEDIUM = Recipe(
    name="mobilenet_v4_hybrid_medium",
    epochs=500,  # train_steps 39,000 / 78
    batch_size=16384,  # train_data.global_batch_size
    optimizer="adamw",  # optimizer.type
    lr=0.016,  # cosine.initial_learning_rate
    lr_batch=16384,  # train_data.global_batch_size
    adam_betas=(0.9, 0.999),  # adamw beta_1, beta_2 (defaults)
    adam_eps=1e-7,  # adamw.epsilon (default)
    weight_decay=0.1,  # adamw.weight_decay_rate
    norm_weight_decay=False,  # adamw.exclude_from_weight_decay
    schedule="cosine",  # learning_rate.type
    warmup_epochs=20,  # warmup.linear.warmup_steps 1560 / 78
    min_lr_ratio=0.0,  # cosine.alpha (default)
    label_smoothing=0.1,  # losses.label_smoothing
    ema_decay=None,  # no ema key
    dropout=0.2,  # model.dropout_rate
    bn_momentum=0.003,  # norm_activation.norm_momentum 0.997
    resolution=256,  # model.input_size
    augment=Augment(auto_augment="randaugment"),  # aug_type randaug (not its magnitude 15)
    drop_path=0.075,  # stochastic_depth_drop_rate
    drop_path_flat=False,  # flat_stochastic_depth_drop_rate
    bn_eps=1e-3,  # norm_activation.norm_epsilon (default)
)

# Hybrid-L: imagenet_mobilenetv4_hybrid_large_tpu.yaml ("Top-1 Acc: 83.7% @ 500 epochs").
_MOBILENET_V4_HYBRID_LARGE = Recipe(
    name="mobilenet_v4_hybrid_large",
    epochs=500,  # train_steps 39,000 / 78
    batch_size=16384,  # train_data.global_batch_size
    optimizer="adamw",  # optimizer.type
    lr=0.01,  # cosine.initial_learning_rate
    lr_batch=16384,  # train_data.global_batch_size
    adam_betas=(0.9, 0.999),  # adamw beta_1, beta_2 (defaults)
    adam_eps=1e-7,  # adamw.epsilon (default)
    weight_decay=0.2,  # adamw.weight_decay_rate
    norm_weight_decay=False,  # adamw.exclude_from_weight_decay
    schedule="cosine",  # learning_rate.type
    warmup_epochs=20,  # warmup.linear.warmup_steps 1560 / 78
    min_lr_ratio=0.001,  # cosine.alpha
    label_smoothing=0.1,  # losses.label_smoothing, mixup_and_cutmix.label_smoothing (default)
    ema_decay=None,  # no ema key
    dropout=0.2,  # model.dropout_rate
    bn_momentum=0.003,  # norm_activation.norm_momentum 0.997
    resolution=384,  # model.input_size
    augment=Augment(auto_augment="randaugment"),  # aug_type randaug (not its magnitude 15)
    mixup=0.8,  # mixup_and_cutmix.mixup_alpha
    cutmix=1.0,  # mixup_and_cutmix.cutmix_alpha
    mix_prob=0.3,  # mixup_and_cutmix.prob
    switch_prob=0.5,  # mixup_and_cutmix.switch_prob (default)
    drop_path=0.35,  # stochastic_depth_drop_rate
    drop_path_flat=False,  # flat_stochastic_depth_drop_rate
    bn_eps=1e-3,  # norm_activation.norm_epsilon
)

# The recipe of each MobileNetV4 model, by its model name (`mobilenet list`).
MOBILENET_V4_RECIPES: dict[str, Recipe] = {
    "mobilenet_v4_conv_small": replace(_MOBILENET_V4, name="mobilenet_v4_conv_small"),
    "mobilenet_v4_conv_medium": _MOBILENET_V4_CONV_MEDIUM,
    "mobilenet_v4_conv_large": _MOBILENET_V4_CONV_LARGE,
    "mobilenet_v4_hybrid_medium": _MOBILENET_V4_HYBRID_MEDIUM,
    "mobilenet_v4_hybrid_large": _MOBILENET_V4_HYBRID_LARGE,
}

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
    "mobilenet_v4": _MOBILENET_V4,  # above; resolve_recipe picks the model's own
    **MOBILENET_V4_RECIPES,  # above
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
        bn_eps=None,  # the model's default
    ),
}


def resolve_recipe(name: str, model: str) -> Recipe:
    """The recipe ``name`` stands for when training ``model``: ``mobilenet_v4`` is the
    model's own MobileNetV4 recipe (``mobilenet_v4_conv_medium`` for that model), or the
    Conv-S one for a model without one; every other name is its own recipe."""
    if name not in RECIPES:
        raise MobileNetError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}")
    if name == "mobilenet_v4":
        return MOBILENET_V4_RECIPES.get(model, RECIPES[name])
    return RECIPES[name]


def get_recipe(name: str, *, model: str | None = None, **overrides: Any) -> Recipe:
    """A named recipe with some fields replaced (``None`` values are ignored); with
    ``model``, the recipe the name stands for when training it (:func:`resolve_recipe`)."""
    if name not in RECIPES:
        raise MobileNetError(f"unknown recipe {name!r}; choose from: {', '.join(RECIPES)}")
    names = {f.name for f in fields(Recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise MobileNetError(f"unknown recipe fields: {', '.join(sorted(unknown))}")
    recipe = RECIPES[name] if model is None else resolve_recipe(name, model)
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


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
