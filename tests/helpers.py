"""Test helpers: realistic BatchNorm statistics for output comparisons; a count of what a
call computes; runs of the command line in child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mobilenet import create_model
from mobilenet.export.prepare import measure_batchnorm


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics.

    A freshly initialised network in eval mode shrinks activations towards zero, which
    makes any output comparison meaningless; random statistics of a realistic scale
    (variance near 1, small means) keep activations O(1) so differences show.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
    return model


def randomize_v5(model: nn.Module, seed: int = 0) -> nn.Module:
    """A MobileNetV5 (ours or timm's) with random RMS norm scales, layer scales (1e-5 at
    init would hide the residual branches) and biases, so every tensor shows in the
    output; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale.gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 1:  # RMS norm scales
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def recalibrate_bn(model: nn.Module, resolution: int = 96, seed: int = 0) -> nn.Module:
    """Set BatchNorm running statistics to those of a random batch (cumulative average).

    Keeps every layer's output near unit scale, so that logits are O(1) and an absolute
    tolerance on them means something; affine parameters are left as they are.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 3, resolution, resolution, generator=g)
    return measure_batchnorm(model, [x])


def unit_scale_logits(model: nn.Module, classifier: nn.Linear, resolution: int = 160) -> nn.Module:
    """Rescale the last layer so logits have unit standard deviation on random images.

    Float32 kernels that sum in different orders differ by a relative ~1e-6; with logits
    near 1, an absolute tolerance such as 1e-4 then means the same thing for every model.
    """
    model.eval()
    with torch.no_grad():
        std = model(torch.randn(4, 3, resolution, resolution)).std()
        classifier.weight /= std
        classifier.bias /= std
    return model


def random_model(name: str, resolution: int, width_mult: float = 0.5, seed: int = 0):
    """Zoo model ``name`` (10 classes) with seeded random weights and BatchNorm, and logits
    of unit scale at ``resolution``. Seeded because the int8 exporters' checks compare two
    int8 roundings over fifty layers of random weights, which some draws take past their
    slack (integer-only V3-Small in ExecuTorch: 0.84x to 1.59x of PyTorch's error for eight
    seeds, 2.0x once unseeded); the global random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_model(name, width_mult=width_mult, num_classes=10)
        model = recalibrate_bn(randomize_bn(model, seed), resolution=resolution, seed=seed)
        return unit_scale_logits(model, model.classifier, resolution=resolution)


class RealTensors(TorchDispatchMode):
    """Counts the elements of every tensor an operator makes off the meta device: a
    command that makes none has computed nothing, however long a busy machine took."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.elements += t.numel()
        return out


# ----------------------------------------------------------------------------- runs

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def mobilenet_command(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m mobilenet ARGS`` in a child process with one OpenMP thread."""
    command = [sys.executable, "-m", "mobilenet", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=900)


# ``mobilenet ARGS`` in a child process that pauses at its second optimizer step after the
# first ``last.pt`` was saved, in the middle of the next epoch, and says so on stdout.
_PAUSED_RUN = """\
import os, sys
from pathlib import Path
from torch.optim.optimizer import register_optimizer_step_post_hook
from mobilenet.cli import main

saved, steps = Path(sys.argv[1]) / "last.pt", []

def pause(optimizer, args, kwargs):
    if saved.exists():
        steps.append(None)
        if len(steps) == 2:
            print("paused mid-epoch", flush=True)
            sys.stdin.read()  # until killed (or until the test is gone)
            os._exit(1)

register_optimizer_step_post_hook(pause)
sys.exit(main(sys.argv[2:]))
"""


def kill_mid_epoch(args: list[str], out: Path) -> int:
    """Start ``mobilenet ARGS --out OUT``, SIGKILL it in the middle of the epoch after the
    first ``last.pt``; returns the epoch that ``last.pt`` holds.

    The run pauses at a known step and the kill follows its word on stdout, so the kill
    lands in the same place on a busy machine as on an idle one (the epoch must have at
    least two steps).
    """
    command = [sys.executable, "-c", _PAUSED_RUN, str(out), *args, "--out", str(out)]
    proc = subprocess.Popen(
        command,
        env=ENV,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    safety_net = threading.Timer(1800, proc.kill)  # a run that never pauses is ended
    safety_net.start()
    try:
        output, paused = [], False
        for line in proc.stdout:  # type: ignore[union-attr]
            paused = line == "paused mid-epoch\n"
            if paused:
                break
            output.append(line)
        assert paused, "the run did not reach its second epoch:\n" + "".join(output[-30:])
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    finally:
        safety_net.cancel()
        proc.kill()
        proc.communicate()
    return torch.load(out / "last.pt", weights_only=True)["epoch"]


def digits_config(out: Path, epochs: int, workers: int = 0):
    """A quick classification run on the built-in digits at 32x32, batch 64."""
    from mobilenet.classification.task import TrainConfig
    from mobilenet.train import get_recipe

    recipe = get_recipe("demo", epochs=epochs, batch_size=64, resolution=32)
    return TrainConfig("mobilenet_v3_small", "digits", out, recipe, workers=workers, progress=False)


def poison_losses(monkeypatch, after: int = 0) -> None:
    """Make classification losses NaN after ``after`` batches."""
    import mobilenet.classification.task as task

    real, calls = task.F.cross_entropy, {"n": 0}

    def cross_entropy(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > after else loss

    monkeypatch.setattr(task.F, "cross_entropy", cross_entropy)


def noise_image(folder: Path) -> Path:
    """A 40x30 RGB PNG of random pixels (seeded), for predict."""
    from PIL import Image

    rng = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 255, (30, 40, 3), dtype=torch.uint8, generator=rng).numpy()
    Image.fromarray(pixels).save(folder / "x.png")
    return folder / "x.png"


def cli_json(capsys, *args: str):
    """What ``mobilenet ARGS --json`` prints, parsed; the command must succeed."""
    import json

    from mobilenet.cli import main

    assert main([*args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


# PyTorch's int8 models run on the x86 quantized engine (fbgemm/oneDNN); an ARM build of
# torch has qnnpack only, and the int8 commands refuse in one line there (tested).
needs_x86_int8 = pytest.mark.skipif(
    "x86" not in torch.backends.quantized.supported_engines,
    reason="PyTorch int8 models need the x86 quantized engine, absent from this torch build",
)


# ----------------------------------------------------------------------------- the zoo

# timm's own variants of V2-V4 (deeper, anti-aliased); tests/test_timm_family.py checks
# each against timm.
TIMM_VARIANTS = (
    "mobilenet_v2_110d",
    "mobilenet_v2_120d",
    "mobilenet_v3_large_150d",
    "mobilenet_v4_conv_aa_medium",
    "mobilenet_v4_conv_blur_medium",
    "mobilenet_v4_conv_aa_large",
)


def paper_models() -> list[str]:
    """The papers' classifiers (V1-V4), which the zoo-wide tests (every model builds,
    runs at any size, exports, quantizes) run over. MobileNetV5 (an encoder whose
    features are the fusion adapter's map) and timm's variants have their own test files
    against timm: tests/test_mobilenet_v5.py and tests/test_timm_family.py."""
    from mobilenet import list_models

    return [
        name
        for name in list_models()
        if name not in TIMM_VARIANTS and not name.startswith("mobilenet_v5")
    ]
