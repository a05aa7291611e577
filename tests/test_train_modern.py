"""What modern recipes add to the engine: gradient accumulation, layer-wise learning-rate
decay, repeated augmentation, a compiled step, and every flag's refusal in one line."""

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from mobilenet import create_model
from mobilenet.classification.task import TrainConfig, train
from mobilenet.cli import main
from mobilenet.train import get_recipe
from mobilenet.train.optim import build_optimizer, layer_depths, param_groups

from .helpers import kill_mid_epoch
from .helpers import mobilenet_command as cli

QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "64"]
QUICK += ["--workers", "0", "--quiet"]


def _without_batchnorm(width: float = 0.35) -> nn.Module:
    model = create_model("mobilenet_v2", width_mult=width, num_classes=0, dropout=0.0)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Identity())
    return model


def _digits_training_images() -> int:
    from mobilenet.data import builtin_splits

    return len(builtin_splits("digits", None, None).train)


def _weights_after_one_epoch(tmp_path, name: str, batch: int, accumulate: int) -> dict:
    recipe = get_recipe(
        "demo", epochs=1, batch_size=batch, resolution=32, optimizer="sgd", warmup_epochs=0.0
    )
    torch.manual_seed(0)
    model = _without_batchnorm()
    out = tmp_path / name
    cfg = TrainConfig("mobilenet_v2", "digits", out, recipe, workers=0, progress=False,
                      lr=0.05, grad_accum_steps=accumulate)  # fmt: skip
    torch.manual_seed(0)
    train(cfg, model=model)
    return torch.load(out / "last.pt", weights_only=True)


def test_accumulated_steps_equal_one_large_batch_without_batchnorm(tmp_path):
    """4 batches of 16 summed into one step equal one batch of 64 within float rounding:
    the same images (one order per seed), the same mean loss, the same schedule."""
    large = _weights_after_one_epoch(tmp_path, "large", 64, 1)
    summed = _weights_after_one_epoch(tmp_path, "summed", 16, 4)
    steps = _digits_training_images() // 64
    assert large["scheduler"]["last_epoch"] == summed["scheduler"]["last_epoch"] == steps
    worst = max((large["model"][k] - summed["model"][k]).abs().max().item() for k in large["model"])
    assert worst < 1e-5
    moved = max(
        (large["model"][k] - summed["model"][k] * 0).abs().max().item() for k in large["model"]
    )
    assert moved > 1e-3  # it trained


def test_layer_decay_scales_each_layer_from_the_top():
    model = create_model("mobilenet_v3_small", width_mult=0.35, num_classes=10)
    depths = layer_depths(model)
    count = len(model.features)
    assert depths["classifier.weight"] == 0
    assert depths["features.0.conv.weight"] == count
    assert depths[next(k for k in depths if k.startswith(f"features.{count - 1}."))] == 1
    recipe = replace(get_recipe("modern"), layer_decay=0.5)
    optimizer = build_optimizer(model, recipe, 0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.1 * 0.5 ** depths[name]), name
    assert max(g["lr"] for g in optimizer.param_groups) == optimizer.param_groups[0]["lr"]
    # weight decay still off on norms and biases, whatever the layer
    for group in param_groups(model, 2e-5, False, 0.5):
        dims = {p.dim() for p in group["params"]}
        assert (group["weight_decay"] == 0) == (dims == {1})


def test_the_epoch_has_whole_accumulated_steps_and_the_effective_batch_scales_the_lr(tmp_path):
    out = tmp_path / "run"
    recipe = get_recipe("demo", epochs=1, batch_size=32, resolution=32)
    cfg = TrainConfig("mobilenet_v3_small", "digits", out, recipe, workers=0, progress=False,
                      width_mult=0.35, grad_accum_steps=3)  # fmt: skip
    train(cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["lr"] == pytest.approx(recipe.scaled_lr(96))
    last = torch.load(out / "last.pt", weights_only=True)
    # whole accumulated steps: the batches after the last full one are not drawn
    assert last["scheduler"]["last_epoch"] == (_digits_training_images() // 32) // 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grad-accum-steps", "0"], "--grad-accum-steps: must be > 0"),
        (["--mixup", "-1"], "--mixup"),
        (["--cutmix", "nan"], "--cutmix"),
        (["--mix-prob", "1.5"], "--mix-prob"),
        (["--drop-path", "1.5"], "--drop-path must be in [0, 1), got 1.5"),
        (["--aug-repeats", "0"], "--aug-repeats"),
        (["--layer-decay", "0"], "--layer-decay must be in (0, 1]"),
        (["--teacher", "no/such/teacher.safetensors"], "--teacher no/such/teacher.safetensors"),
        (["--kd-alpha", "0.3"], "--kd-alpha needs a --teacher"),
        (["--kd-features", "1"], "--kd-features needs a --teacher"),
        (["--model", "mobilenet_v1", "--drop-path", "0.1"], "drop"),
    ],
)
def test_bad_modern_flags_write_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main(["train", "--data", "digits", "--out", str(out), *QUICK, *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_teacher_of_another_task_is_refused_in_one_line(tmp_path, capsys):
    from mobilenet.weights import save_weights

    detector = tmp_path / "ssdlite.safetensors"
    save_weights(create_model("ssdlite_mobilenet_v3_small", width_mult=0.35), detector)
    out = tmp_path / "out"
    code = main(
        ["train", "--data", "digits", "--out", str(out), *QUICK, "--teacher", str(detector)]
    )
    err = capsys.readouterr().err
    assert code == 2 and "--teacher" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_the_recipe_is_printed_as_resolved(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--out", str(out), "--model", "mobilenet_v3_small",
            "--width-mult", "0.35", "--resolution", "32", "--batch-size", "64", "--workers", "0",
            "--recipe", "demo", "--epochs", "1", "--mixup", "0.2",
            "--grad-accum-steps", "2"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "recipe demo (resolved; lr 0.004 for an effective batch of 128)" in printed
    assert "  mixup              0.2" in printed
    assert "train top-1 (dominant label)" in printed


def _digit_teacher(tmp_path) -> str:
    """A V2 classifier of the digits' ten classes at 32 pixels (random weights)."""
    from mobilenet.card import ModelCard
    from mobilenet.weights import save_weights

    from .helpers import random_model

    model = random_model("mobilenet_v2", 32, width_mult=0.35)
    card = ModelCard(classes=tuple(str(i) for i in range(10)), input_size=(32, 32))
    return str(save_weights(model, tmp_path / "teacher.safetensors", card.metadata()))


@pytest.mark.slow
def test_resume_with_everything_on_is_bit_exact(tmp_path):
    """Killed mid-epoch and resumed with a teacher (logits and features), MixUp and
    CutMix, drop path, accumulation and repeated augmentation: the same weights, EMA and
    metrics, bit for bit, as the run that was never stopped."""
    args = ["train", "--data", "digits", "--recipe", "paper-v2", "--epochs", "3", *QUICK,
            "--teacher", _digit_teacher(tmp_path), "--kd-alpha", "0.7", "--kd-temperature", "2",
            "--kd-features", "0.5", "--mixup", "0.8", "--cutmix", "1.0", "--drop-path", "0.1",
            "--grad-accum-steps", "2", "--aug-repeats", "2"]  # fmt: skip
    interrupted = tmp_path / "interrupted"
    assert kill_mid_epoch(args, interrupted) < 3
    resumed = cli(*args, "--out", str(interrupted), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    uninterrupted = cli(*args, "--out", str(tmp_path / "straight"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr

    a = torch.load(interrupted / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert any(k.startswith("projection.") for k in a["model"])  # the feature projection
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    assert a["history"] == b["history"] or all(
        {k: v for k, v in x.items() if "seconds" not in k and "per_s" not in k and "ms" not in k}
        == {k: v for k, v in y.items() if "seconds" not in k and "per_s" not in k and "ms" not in k}
        for x, y in zip(a["history"], b["history"], strict=True)
    )
    # the best weights are the student's alone, and they load as a classifier
    from mobilenet.weights import read_checkpoint

    state_dict, _ = read_checkpoint(interrupted / "best.safetensors")
    assert not any(k.startswith(("projection.", "student.")) for k in state_dict)


def test_the_recipe_builds_the_model_it_names():
    """Conv-L's config: one drop path rate for every block (flat), its BatchNorm epsilon."""
    from mobilenet.classification.task import build_model
    from mobilenet.layers import DropPath

    recipe = get_recipe("mobilenet_v4", model="mobilenet_v4_conv_large")
    assert recipe.name == "mobilenet_v4_conv_large" and recipe.drop_path_flat
    model = build_model(TrainConfig("mobilenet_v4_conv_large", "digits", None, recipe))
    rates = {m.p for m in model.modules() if isinstance(m, DropPath)}
    assert rates == {recipe.drop_path}
    eps = {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert eps == {recipe.bn_eps}
    medium = get_recipe("mobilenet_v4", model="mobilenet_v4_conv_medium")
    model = build_model(TrainConfig("mobilenet_v4_conv_medium", "digits", None, medium))
    rates = sorted(m.p for m in model.modules() if isinstance(m, DropPath))
    assert len(set(rates)) > 1 and max(rates) <= medium.drop_path  # linear in depth


def test_repeated_augmentation_is_the_training_sampler(tmp_path):
    from mobilenet.train.distributed import setup
    from mobilenet.train.engine import RunConfig, Setup, train_loader
    from mobilenet.train.sampler import RepeatedAugmentationSampler

    recipe = get_recipe("demo", batch_size=8, aug_repeats=3)
    data = torch.utils.data.TensorDataset(torch.zeros(40, 1), torch.zeros(40))
    run = RunConfig(tmp_path, recipe, workers=0)
    loader = train_loader(Setup(nn.Linear(1, 1), data), run, setup("cpu"))
    assert isinstance(loader.sampler, RepeatedAugmentationSampler)
    loader.sampler.set_epoch(0)
    seen = list(loader.sampler)
    # 40 images x 3 copies, the first 40 of them: 13 images three times, one once
    counts = sorted(seen.count(i) for i in set(seen))
    assert len(seen) == 40 and counts == [1] + [3] * 13


@pytest.mark.slow
def test_compile_trains_the_same_network_as_eager(tmp_path, monkeypatch):
    """--compile runs the training step through torch.compile (here with the
    ``aot_eager`` backend: dynamo's graph capture and AOTAutograd's backward, without
    the C++ code generation a real run adds): the same weights as eager, to rounding."""
    from mobilenet.train import state as state_module

    compiled_modules = []
    real = torch.compile

    def compile_spy(module, **kwargs):
        compiled_modules.append(module)
        return real(module, backend="aot_eager", **kwargs)

    monkeypatch.setattr(state_module.torch, "compile", compile_spy)
    results = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        recipe = get_recipe(
            "demo", epochs=1, batch_size=64, resolution=32, dropout=0.0, optimizer="sgd"
        )
        out = tmp_path / str(compiled)
        cfg = TrainConfig("mobilenet_v3_small", "digits", out, recipe, workers=0,
                          width_mult=0.35, progress=False, compile=compiled,
                          lr=0.01)  # fmt: skip
        torch.manual_seed(0)
        train(cfg)
        results[compiled] = torch.load(out / "last.pt", weights_only=True)["model"]
    assert len(compiled_modules) == 1
    # SGD: a rounding difference stays a rounding difference (Adam's step, the same size
    # for any gradient near zero, would turn one into a whole step of the rate)
    worst = max((results[True][k].float() - results[False][k].float()).abs().max().item()
                for k in results[False] if "running" not in k)  # fmt: skip
    assert worst < 1e-4
