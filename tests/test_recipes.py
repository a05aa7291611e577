"""Recipes and the TF-style RMSProp."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from mobilenet import MobileNetError, create_model
from mobilenet.train import RECIPES, RMSpropTF, get_recipe
from mobilenet.train.optim import build_ema, build_optimizer, lr_factor, param_groups


def tf_rmsprop(params, grads, lrs, decay, momentum, eps, weight_decay):
    """TensorFlow's ApplyRMSProp kernel (tf.compat.v1.train.RMSPropOptimizer), in numpy.

    ms <- rho * ms + (1 - rho) * g^2;  mom <- momentum * mom + lr * g / sqrt(ms + eps);
    var <- var - mom; the mean-square slot starts at ones; L2 decay is part of the loss.
    """
    p = params.astype(np.float64).copy()
    ms = np.ones_like(p)
    mom = np.zeros_like(p)
    for g, lr in zip(grads, lrs, strict=True):
        g = g + weight_decay * p
        ms = decay * ms + (1 - decay) * g * g
        mom = momentum * mom + lr * g / np.sqrt(ms + eps)
        p = p - mom
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 4e-5])
def test_rmsprop_tf_matches_the_tensorflow_formula(weight_decay):
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 7))
    grads = [rng.normal(size=(5, 7)) for _ in range(10)]
    lrs = [0.045 * 0.98**i for i in range(10)]  # the rate changes between steps
    expected = tf_rmsprop(start, grads, lrs, 0.9, 0.9, 1e-3, weight_decay)

    p = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = RMSpropTF([p], lr=lrs[0], decay=0.9, momentum=0.9, eps=1e-3, weight_decay=weight_decay)
    for g, lr in zip(grads, lrs, strict=True):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-6, rtol=0)
    # ... and differs from PyTorch's RMSprop, which puts eps outside the root and starts at 0.
    q = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    torch_opt = torch.optim.RMSprop([q], lr=lrs[0], alpha=0.9, momentum=0.9, eps=1e-3)
    for g in grads:
        q.grad = torch.tensor(g)
        torch_opt.step()
    assert np.abs(q.detach().numpy() - expected).max() > 1e-3


def test_recipes_follow_the_papers():
    v2, v3 = RECIPES["paper-v2"], RECIPES["paper-v3"]
    assert (v2.optimizer, v2.rmsprop_decay, v2.momentum) == ("rmsprop_tf", 0.9, 0.9)
    assert (v2.weight_decay, v2.lr, v2.decay_rate, v2.decay_epochs) == (4e-5, 0.045, 0.98, 1)
    assert v2.label_smoothing == 0.1 and v2.ema_decay
    assert (v3.weight_decay, v3.dropout, v3.ema_decay) == (1e-5, 0.2, 0.9999)
    assert (v3.decay_rate, v3.decay_epochs) == (0.99, 3)
    assert v3.scaled_lr(4096) == pytest.approx(0.1) and v3.scaled_lr(128) == pytest.approx(0.1 / 32)
    modern = RECIPES["modern"]
    assert modern.schedule == "cosine" and modern.warmup_epochs > 0
    assert not modern.norm_weight_decay and modern.augment.random_erasing > 0
    assert RECIPES["demo"].augment.hflip == 0  # digits are not mirror-symmetric
    for recipe in RECIPES.values():
        assert dataclasses.is_dataclass(recipe)
        with pytest.raises(dataclasses.FrozenInstanceError):
            recipe.lr = 1.0  # type: ignore[misc]


def test_v4_recipe_follows_the_authors_config():
    # TF model garden, imagenet_mobilenetv4_conv_small_tpu.yaml (V4 Table 5's Conv-S)
    v4 = RECIPES["mobilenet_v4"]
    assert (v4.optimizer, v4.adam_betas, v4.adam_eps) == ("adamw", (0.6, 0.999), 1e-6)
    assert (v4.lr, v4.lr_batch, v4.weight_decay, v4.norm_weight_decay) == (0.002, 4096, 0.01, False)
    assert (v4.schedule, v4.warmup_epochs, v4.epochs, v4.min_lr_ratio) == ("cosine", 5, 9623, 0)
    assert (v4.label_smoothing, v4.dropout, v4.ema_decay) == (0.1, 0.3, 0.9999)
    assert v4.bn_momentum == pytest.approx(1 - 0.95)  # TF's decay 0.95
    assert v4.augment.auto_augment == "randaugment" and v4.augment.hflip == 0.5
    demo = RECIPES["mobilenet_v4-demo"]
    for field in ("optimizer", "adam_betas", "adam_eps", "weight_decay", "label_smoothing"):
        assert getattr(demo, field) == getattr(v4, field), field
    assert demo.dropout == v4.dropout and demo.augment.hflip == 0
    assert demo.scaled_lr(64) == pytest.approx(0.002)
    opt = build_optimizer(create_model("mobilenet_v4_conv_small", width_mult=0.35), v4, 0.002)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.6, 0.999), 1e-6, 0.01)
    assert opt.param_groups[1]["weight_decay"] == 0  # none on BatchNorm


def test_randaugment_transform():
    from mobilenet.data.transforms import Augment, train_transform
    from mobilenet.models.base import EvalConfig

    tf = train_transform(32, Augment(auto_augment="randaugment"), EvalConfig())
    assert any(type(t).__name__ == "RandAugment" for t in tf.transforms)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    assert tf(image).shape == (3, 32, 32)


def test_get_recipe_overrides_and_errors():
    r = get_recipe("paper-v2", epochs=3, batch_size=None)
    assert r.epochs == 3 and r.batch_size == RECIPES["paper-v2"].batch_size
    with pytest.raises(MobileNetError, match="unknown recipe 'fast'"):
        get_recipe("fast")


def test_schedules():
    v2 = RECIPES["paper-v2"]
    assert lr_factor(v2, 0.5, 10) == 1.0 and lr_factor(v2, 2.2, 10) == pytest.approx(0.98**2)
    v3 = RECIPES["paper-v3"]
    assert lr_factor(v3, 2.9, 10) == 1.0 and lr_factor(v3, 3.0, 10) == pytest.approx(0.99)
    modern = RECIPES["modern"]
    assert lr_factor(modern, 0.0, 600) < 0.01  # warm-up starts near zero
    assert lr_factor(modern, 5.0, 600) == pytest.approx(1.0)
    assert lr_factor(modern, 600, 600) == pytest.approx(0.0)


def test_no_weight_decay_on_norm_and_bias():
    model = create_model("mobilenet_v3_small")
    decay, no_decay = param_groups(model, 1e-4, norm_weight_decay=False)
    assert all(p.dim() > 1 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0
    n = sum(len(g["params"]) for g in (decay, no_decay))
    assert n == len(list(model.parameters()))
    opt = build_optimizer(model, RECIPES["modern"], 0.1)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]


def test_ema_warms_up_like_tensorflow():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = build_ema(model, 0.9999)
    ema.update_parameters(model)  # the first update takes the weights as they are: 0
    assert ema.module.weight.item() == 0.0
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # then n = 1: decay = min(0.9999, (1 + 1) / (10 + 1))
    assert ema.module.weight.item() == pytest.approx(9 / 11)
    for _ in range(10_000):
        ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(1.0, abs=1e-3)
