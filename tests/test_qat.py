"""Quantization-aware training on the engine: exact resume, the freeze schedule, the EMA of
a fake-quantized network, the run folder."""

import json

import pytest
import torch

from mobilenet.classification.predict import load_trained
from mobilenet.classification.qat import QATConfig, QATTask, quantize_aware
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.export.int8 import prepare_fx_int8, x86_backend
from mobilenet.train.optim import build_ema

from .helpers import needs_x86_int8

pytestmark = needs_x86_int8

QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "64"]
QUICK += ["--workers", "0", "--quiet", "--width-mult", "0.5"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("qat") / "run"
    assert main(["train", "--data", "digits", "--epochs", "2", "--out", str(out), *QUICK]) == 0
    return str(out / "best.safetensors")


def _fake_quantizers(model):
    from torch.ao.quantization import FakeQuantizeBase

    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def test_the_freeze_schedule_is_a_function_of_the_epoch(weights, tmp_path):
    trained = load_trained(weights)
    task = QATTask(trained, QATConfig("digits", tmp_path / "run"))
    with x86_backend():
        model = prepare_fx_int8(trained.model, "qat", trained.resolution)
    fq = _fake_quantizers(model)
    conv_bn = [m for m in model.modules() if hasattr(m, "freeze_bn")]
    assert fq and conv_bn
    task.start_epoch(model, 0)
    assert all(int(m.observer_enabled) == 1 for m in fq)
    assert not any(m.freeze_bn for m in conv_bn)
    task.start_epoch(model, 1)  # BatchNorm statistics frozen; ranges still observed
    assert all(m.freeze_bn for m in conv_bn) and all(int(m.observer_enabled) for m in fq)
    model.train()  # training mode keeps the frozen BatchNorm in eval
    assert all(not m.bn.training for m in conv_bn)
    task.start_epoch(model, 2)  # and the quantization ranges
    assert all(int(m.observer_enabled) == 0 for m in fq)
    assert all(int(m.fake_quant_enabled) == 1 for m in fq)


def test_the_ema_of_a_fake_quantized_network_keeps_its_switches(weights):
    trained = load_trained(weights)
    with x86_backend():
        model = prepare_fx_int8(trained.model, "qat", trained.resolution).train()
    ema = build_ema(model, 0.9999)
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32))
        ema.update_parameters(model)
    # Integer buffers (on/off switches, zero points, batch counts) are the network's own:
    # averaged, 1 * d + 1 * (1 - d) rounds below 1 and fake quantization would switch off.
    current = model.state_dict()
    for name, averaged in ema.module.state_dict().items():
        if not averaged.is_floating_point():
            assert torch.equal(averaged, current[name]), name
    assert all(int(m.fake_quant_enabled) == 1 for m in _fake_quantizers(ema.module))


def test_qat_resumes_exactly(weights, tmp_path, monkeypatch):
    trained = load_trained(weights)
    settings = dict(data="digits", epochs=3, batch_size=32, ema_decay=0.99)
    straight = tmp_path / "straight.safetensors"
    quantize_aware(trained, QATConfig(out=tmp_path / "a", **settings), straight)

    start = QATTask.start_epoch

    def interrupted(self, model, epoch):
        if epoch == 2:  # after two epochs were saved, as a Ctrl-C would
            raise KeyboardInterrupt
        start(self, model, epoch)

    resumed = tmp_path / "resumed.safetensors"
    monkeypatch.setattr(QATTask, "start_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_aware(load_trained(weights), QATConfig(out=tmp_path / "b", **settings), resumed)
    assert not resumed.exists() and (tmp_path / "b" / "last.pt").is_file()
    monkeypatch.setattr(QATTask, "start_epoch", start)
    with pytest.raises(MobileNetError, match="--resume"):
        quantize_aware(load_trained(weights), QATConfig(out=tmp_path / "b", **settings), resumed)
    config = QATConfig(out=tmp_path / "b", resume=True, **settings)
    quantize_aware(load_trained(weights), config, resumed)
    _same_file(resumed, straight)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert rows == (tmp_path / "a" / "metrics.csv").read_text().splitlines()[:1] + rows[1:]
    assert len(rows) == 4


def _same_file(first, second):
    """The same tensors, bit for bit, and the same metadata (safetensors orders the header
    of each write as it likes, so the bytes and the digest over them may differ)."""
    from safetensors import safe_open

    with safe_open(str(first), "pt") as a, safe_open(str(second), "pt") as b:
        meta_a, meta_b = a.metadata(), b.metadata()
        meta_a.pop("digest"), meta_b.pop("digest")
        names = sorted(a.keys())
        assert meta_a == meta_b and names == sorted(b.keys())
        for key in names:
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert x.reshape(-1).view(torch.uint8).equal(y.reshape(-1).view(torch.uint8)), key


def test_qat_flags_and_the_run_folder(weights, tmp_path, capsys):
    base = ["quantize", "--weights", weights, "--data", "digits", "--method", "qat"]
    out = tmp_path / "q.safetensors"
    assert main([*base, "--out", str(out), "--epochs", "1", "--run", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr()
    assert "QAT epoch 1/1" in printed.out and "int8 val top-1" in printed.out
    card = json.loads((tmp_path / "r" / "config.json").read_text())
    assert card["task"] == "qat" and card["qat"]["epochs"] == 1
    # The folder holds a run: another one is refused, nothing written.
    again = tmp_path / "again.safetensors"
    assert main([*base, "--out", str(again), "--epochs", "1", "--run", str(tmp_path / "r")]) == 2
    assert "--resume" in capsys.readouterr().err and not again.exists()
    # QAT's own flags with PTQ: refused.
    for flag in (["--run", "x"], ["--resume"], ["--ema-decay", "0.9"]):
        ptq = ["quantize", "--weights", weights, "--data", "digits", "--out", str(again)]
        assert main([*ptq, *flag]) == 2
        assert "applies to --method qat" in capsys.readouterr().err
    assert not again.exists() and not (tmp_path / "x").exists()
    # A run folder that is a file, an int8 file that is a folder: one line each.
    (tmp_path / "afile").write_text("")
    qat = [*base, "--epochs", "1"]
    assert main([*qat, "--out", str(again), "--run", str(tmp_path / "afile")]) == 2
    assert "--run" in capsys.readouterr().err
    assert main([*qat, "--out", str(tmp_path / "r"), "--run", str(tmp_path / "r2")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not again.exists() and not (tmp_path / "r2").exists()
