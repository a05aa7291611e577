"""The MobileNetV4 recipes against the authors' training configs.

Each entry of ``CONFIGS`` holds the raw values of one TF Model Garden file,
official/vision/configs/experiments/image_classification/imagenet_mobilenetv4_<model>_tpu.yaml,
key by key; a key the file leaves out is absent here and takes Model Garden's default
(``DEFAULTS``). The tests convert them with the arithmetic the recipes' comments state, so
a recipe that drifts from its config fails.
"""

import pytest

from mobilenet import MobileNetError
from mobilenet.train import RECIPES, get_recipe
from mobilenet.train.optim import lr_factor
from mobilenet.train.recipes import MOBILENET_V4_RECIPES, resolve_recipe

from .helpers import paper_models

# official/vision/configs/image_classification.py: IMAGENET_TRAIN_EXAMPLES, and an epoch of
# IMAGENET_TRAIN_EXAMPLES // train_batch_size steps.
IMAGENET_TRAIN_EXAMPLES = 1281167

# Model Garden's defaults for the keys some files leave out: AdamWeightDecayConfig
# (optimizer_config.py), CosineLrConfig (learning_rate_config.py), NormActivation and
# MixupAndCutmix (vision/configs/common.py), backbones.MobileNet.
DEFAULTS = {
    "beta_1": 0.9,
    "beta_2": 0.999,
    "epsilon": 1e-07,
    "alpha": 0.0,
    "norm_epsilon": 0.001,
    "stochastic_depth_drop_rate": 0.0,
    "flat_stochastic_depth_drop_rate": True,
    "switch_prob": 0.5,
    "mix_label_smoothing": 0.1,
}

CONFIGS = {
    "mobilenet_v4_conv_small": {  # imagenet_mobilenetv4_conv_small_tpu.yaml
        "input_size": [224, 224, 3],
        "norm_epsilon": 1.0e-06,
        "norm_momentum": 0.95,
        "dropout_rate": 0.3,
        "label_smoothing": 0.1,
        "global_batch_size": 4096,
        "randaug_magnitude": 9,
        "train_steps": 3002368,
        "average_decay": 0.9999,
        "initial_learning_rate": 0.002,
        "beta_1": 0.6,
        "epsilon": 1.0e-06,
        "weight_decay_rate": 0.01,
        "warmup_steps": 1560,
    },
    "mobilenet_v4_conv_medium": {  # imagenet_mobilenetv4_conv_medium_tpu.yaml
        "input_size": [256, 256, 3],
        "flat_stochastic_depth_drop_rate": False,
        "stochastic_depth_drop_rate": 0.075,
        "norm_epsilon": 0.001,
        "norm_momentum": 0.997,
        "dropout_rate": 0.2,
        "label_smoothing": 0.1,
        "global_batch_size": 4096,
        "randaug_magnitude": 15,
        "train_steps": 156000,
        "initial_learning_rate": 0.004,
        "weight_decay_rate": 0.1,
        "warmup_steps": 1560,
    },
    "mobilenet_v4_conv_large": {  # imagenet_mobilenetv4_conv_large_tpu.yaml
        "input_size": [384, 384, 3],
        "flat_stochastic_depth_drop_rate": True,
        "stochastic_depth_drop_rate": 0.2,
        "norm_epsilon": 0.001,
        "norm_momentum": 0.997,
        "dropout_rate": 0.2,
        "soft_labels": True,
        "label_smoothing": 0.1,
        "global_batch_size": 16384,
        "randaug_magnitude": 15,
        "mixup_and_cutmix": {
            "cutmix_alpha": 1.0,
            "label_smoothing": 0.1,
            "mixup_alpha": 0.8,
            "prob": 0.2,
            "switch_prob": 0.5,
        },
        "train_steps": 39000,
        "initial_learning_rate": 0.004,
        "weight_decay_rate": 0.2,
        "warmup_steps": 1560,
    },
    "mobilenet_v4_hybrid_medium": {  # imagenet_mobilenetv4_hybrid_medium_tpu.yaml
        "input_size": [256, 256, 3],
        "flat_stochastic_depth_drop_rate": False,
        "stochastic_depth_drop_rate": 0.075,
        "norm_momentum": 0.997,
        "dropout_rate": 0.2,
        "label_smoothing": 0.1,
        "global_batch_size": 16384,
        "randaug_magnitude": 15,
        "train_steps": 39000,
        "initial_learning_rate": 0.016,
        "weight_decay_rate": 0.1,
        "warmup_steps": 1560,
    },
    "mobilenet_v4_hybrid_large": {  # imagenet_mobilenetv4_hybrid_large_tpu.yaml
        "input_size": [384, 384, 3],
        "flat_stochastic_depth_drop_rate": False,
        "stochastic_depth_drop_rate": 0.35,
        "norm_epsilon": 0.001,
        "norm_momentum": 0.997,
        "dropout_rate": 0.2,
        "label_smoothing": 0.1,
        "soft_labels": True,
        "global_batch_size": 16384,
        "randaug_magnitude": 15,
        "mixup_and_cutmix": {"cutmix_alpha": 1.0, "mixup_alpha": 0.8, "prob": 0.3},
        "train_steps": 39000,
        "initial_learning_rate": 0.01,
        "alpha": 0.001,
        "weight_decay_rate": 0.2,
        "warmup_steps": 1560,
    },
}


def key(config: dict, name: str):
    return config.get(name, DEFAULTS.get(name))


def steps_per_epoch(config: dict) -> int:
    return IMAGENET_TRAIN_EXAMPLES // config["global_batch_size"]


def test_every_v4_model_has_its_recipe():
    # the authors' models (timm's anti-aliased variants have no config of the authors')
    v4_models = [m for m in paper_models() if m.startswith("mobilenet_v4")]
    assert sorted(v4_models) == sorted(CONFIGS) == sorted(MOBILENET_V4_RECIPES)
    for model in CONFIGS:
        assert RECIPES[model] is MOBILENET_V4_RECIPES[model] and RECIPES[model].name == model


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_schedule_follows_the_config(model):
    config, recipe = CONFIGS[model], RECIPES[model]
    per_epoch = steps_per_epoch(config)
    assert (recipe.batch_size, recipe.lr_batch) == (config["global_batch_size"],) * 2
    assert recipe.lr == config["initial_learning_rate"]
    assert recipe.epochs == round(config["train_steps"] / per_epoch)
    assert recipe.warmup_epochs == pytest.approx(config["warmup_steps"] / per_epoch)
    assert (recipe.schedule, recipe.min_lr_ratio) == ("cosine", key(config, "alpha"))
    # The engine's cosine starts after the warm-up and ends at alpha on the last epoch.
    assert lr_factor(recipe, recipe.warmup_epochs, recipe.epochs) == pytest.approx(1.0)
    assert lr_factor(recipe, recipe.epochs, recipe.epochs) == pytest.approx(key(config, "alpha"))


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_optimizer_follows_the_config(model):
    config, recipe = CONFIGS[model], RECIPES[model]
    assert recipe.optimizer == "adamw"
    assert recipe.adam_betas == (key(config, "beta_1"), key(config, "beta_2"))
    assert recipe.adam_eps == key(config, "epsilon")
    assert recipe.weight_decay == config["weight_decay_rate"]
    assert recipe.norm_weight_decay is False  # exclude_from_weight_decay: batch_normalization
    assert recipe.ema_decay == config.get("average_decay")  # no ema key: no EMA


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_model_and_regularisation_follow_the_config(model):
    config, recipe = CONFIGS[model], RECIPES[model]
    assert recipe.resolution == config["input_size"][0] == config["input_size"][1]
    assert recipe.bn_momentum == pytest.approx(1 - config["norm_momentum"])  # TF's decay
    assert recipe.bn_eps == key(config, "norm_epsilon")
    assert recipe.dropout == config["dropout_rate"]
    assert recipe.drop_path == key(config, "stochastic_depth_drop_rate")
    if recipe.drop_path > 0:
        assert recipe.drop_path_flat is key(config, "flat_stochastic_depth_drop_rate")
    mixing = config.get("mixup_and_cutmix")
    if config.get("soft_labels"):  # the loss takes the mixing's smoothed targets as they are
        assert recipe.label_smoothing == mixing.get(
            "label_smoothing", DEFAULTS["mix_label_smoothing"]
        )
    assert recipe.label_smoothing == config["label_smoothing"]
    if mixing is None:
        assert (recipe.mixup, recipe.cutmix) == (0.0, 0.0)
    else:
        assert (recipe.mixup, recipe.cutmix) == (mixing["mixup_alpha"], mixing["cutmix_alpha"])
        assert recipe.mix_prob == mixing["prob"]
        assert recipe.switch_prob == mixing.get("switch_prob", DEFAULTS["switch_prob"])
    # aug_type randaug on the Inception crop with flips; no random erasing.
    augment = recipe.augment
    assert (augment.auto_augment, augment.hflip, augment.random_erasing) == ("randaugment", 0.5, 0)
    assert augment.crop_scale == (0.08, 1.0)
    # No distillation config: the distillation settings keep their defaults.
    assert (recipe.kd_alpha, recipe.kd_temperature) == (0.5, 1.0)


@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_mobilenet_v4_resolves_per_model(model):
    assert resolve_recipe("mobilenet_v4", model) is RECIPES[model]
    assert get_recipe("mobilenet_v4", model=model) == RECIPES[model]
    r = get_recipe("mobilenet_v4", model=model, epochs=3, batch_size=None)
    assert (r.name, r.epochs, r.lr) == (model, 3, RECIPES[model].lr)


def test_mobilenet_v4_is_conv_small_for_other_models():
    v4 = RECIPES["mobilenet_v4"]
    assert resolve_recipe("mobilenet_v4", "mobilenet_v2") is v4
    assert (
        get_recipe("mobilenet_v4") == v4 == get_recipe("mobilenet_v4", model="mobilenet_v3_large")
    )
    conv_s = RECIPES["mobilenet_v4_conv_small"]
    assert v4.name == "mobilenet_v4" and v4.to_dict() | {"name": conv_s.name} == conv_s.to_dict()


def test_other_names_resolve_to_themselves():
    for name in RECIPES:
        if name != "mobilenet_v4":
            assert resolve_recipe(name, "mobilenet_v4_conv_large") is RECIPES[name]
            assert get_recipe(name, model="mobilenet_v4_hybrid_medium") == RECIPES[name]
    demo = get_recipe("mobilenet_v4-demo", model="mobilenet_v4_conv_medium")
    assert (demo.name, demo.epochs, demo.resolution, demo.bn_eps) == (
        "mobilenet_v4-demo",
        12,
        48,
        None,
    )


def test_unknown_names_are_refused():
    with pytest.raises(MobileNetError, match="unknown recipe 'fast'"):
        resolve_recipe("fast", "mobilenet_v4_conv_small")
    with pytest.raises(MobileNetError, match="unknown recipe 'fast'"):
        get_recipe("fast", model="mobilenet_v4_conv_small")
    with pytest.raises(MobileNetError, match="unknown recipe 'mobilenet_v4_conv_tiny'"):
        get_recipe("mobilenet_v4_conv_tiny")
    with pytest.raises(MobileNetError, match="unknown recipe fields: speed"):
        get_recipe("mobilenet_v4", model="mobilenet_v4_conv_large", speed=2)
