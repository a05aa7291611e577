"""The run folder: one run at a time, resume only with the same settings, a failed start
leaves nothing, a dying data loader is one line."""

import fcntl
import json
import os

import pytest
import torch

from mobilenet.classification.task import train
from mobilenet.cli import main
from mobilenet.errors import MobileNetError
from mobilenet.train import run_folder
from mobilenet.train.run_folder import LOCK, RunFolder, claim

from .helpers import digits_config, mobilenet_command

QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "64"]
QUICK += ["--workers", "0", "--quiet", "--data", "digits"]


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, capsys):
    # The folder's lock held here, as a run holds it: the second run is refused whatever
    # the speed of the machine, and touches nothing in the folder. (flock locks belong to
    # an open file, so a run in this same process is refused like one in another.)
    out = tmp_path / "run"
    refused = (
        f"mobilenet train: error: {out} is in use by another run (process {os.getpid()}): "
        "wait for it to finish, or choose another --out\n"
    )
    with claim(out, main=True):
        for resume in ([], ["--resume"]):  # resuming while it runs is refused too
            assert main(["train", *QUICK, "--epochs", "1", *resume, "--out", str(out)]) == 2
            assert capsys.readouterr().err == refused
            assert [p.name for p in out.iterdir()] == [".lock"]
    assert list(out.iterdir()) == []  # the lock is gone with its holder


@pytest.mark.slow  # a training run, and another process importing torch during it
def test_a_run_holds_its_folder_until_it_ends(tmp_path, monkeypatch):
    # The second run is started by the first one's epoch, in another process: the first
    # is then certainly in progress, however fast or slow this machine.
    out, others = tmp_path / "run", []
    real_epoch = RunFolder.epoch

    def epoch(self, row, history):
        others.append(mobilenet_command("train", *QUICK, "--lr", "0.01", "--out", str(out)))
        real_epoch(self, row, history)

    monkeypatch.setattr(RunFolder, "epoch", epoch)
    assert main(["train", *QUICK, "--epochs", "1", "--out", str(out)]) == 0
    [second] = others
    assert second.returncode == 2
    assert f"in use by another run (process {os.getpid()})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["epochs"] == 1 and config["run"]["lr"] is None  # the first run's
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
    assert not (out / ".lock").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *QUICK, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--lr", "0.01"], "lr 0.01"),
        (["--batch-size", "32"], "batch_size 32"),
        (["--resolution", "40"], "resolution 40"),
        (["--recipe", "paper-v2"], "--resume with other settings"),
        (["--width-mult", "0.5"], "width_mult 0.5"),
        (["--model", "mobilenet_v2"], "model 'mobilenet_v2'"),
        (["--seed", "3"], "seed 3"),
        (["--ema-decay", "0.9"], "ema_decay 0.9"),
        (["--epochs", "1"], "trained 2 epochs already"),
    ],
)
def test_resume_refuses_other_settings(finished_run, flags, named, capsys):
    before = (finished_run / "last.pt").read_bytes()
    args = ["train", *QUICK, "--epochs", "2", *flags, "--resume", "--out", str(finished_run)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1, err
    assert err.count(named) == 1, err  # a setting kept twice (task and engine) named once
    assert (finished_run / "last.pt").read_bytes() == before


def test_resume_with_more_epochs_stretches_the_schedule(finished_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "config.json", "metrics.csv", "best.safetensors"):
        (out / name).write_bytes((finished_run / name).read_bytes())
    args = ["train", *QUICK, "--epochs", "4", "--workers", "1", "--resume", "--out", str(out)]
    assert main(args) == 0
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 4
    # The rate of each epoch's last step. The 2-epoch cosine had decayed to about 1e-6;
    # stretched over 4 epochs, epoch 3 ends at a quarter of the peak, epoch 4 near zero.
    lrs = [row["lr"] for row in last["history"]]
    peak = json.loads((out / "config.json").read_text())["lr"]
    assert lrs[1] < 1e-5 and lrs[2] == pytest.approx(peak / 4, rel=0.15) and lrs[3] < 1e-5
    assert json.loads((out / "config.json").read_text())["recipe"]["epochs"] == 4


def test_batch_of_one_image_per_process_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *QUICK[:-2], "--batch-size", "1", "--data", "digits", "--out", str(out)]
    assert main(args) == 2
    assert "BatchNorm needs at least 2" in capsys.readouterr().err
    assert not out.exists()


def test_a_dying_data_loader_is_one_line(tmp_path, monkeypatch):
    from mobilenet.data.datasets import TensorImages

    real = TensorImages.__getitem__

    def die_in_a_worker(self, i):
        if torch.utils.data.get_worker_info() is not None:
            os._exit(1)
        return real(self, i)

    monkeypatch.setattr(TensorImages, "__getitem__", die_in_a_worker)
    out = tmp_path / "run"
    cfg = digits_config(out, epochs=1, workers=1)
    with pytest.raises(MobileNetError, match="a data loading process died"):
        train(cfg)
    assert not out.exists()


def test_a_lock_file_removed_before_its_lock_is_granted_is_not_held(tmp_path, monkeypatch):
    """A run that ends removes its .lock: the next run, which had opened that file, must
    lock the file now at the path, or a third run could lock that one beside it."""
    out = tmp_path / "run"
    out.mkdir()
    real_flock, calls = fcntl.flock, []

    def flock_after_the_holder_left(fd, operation):
        if not calls:  # the first run ends between this run's open and its lock
            (out / LOCK).unlink()
            (out / LOCK).write_text("")
        calls.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(run_folder.fcntl, "flock", flock_after_the_holder_left)
    with claim(out, main=True):
        assert len(calls) == 2  # the removed file, then the one at the path
        monkeypatch.setattr(run_folder.fcntl, "flock", real_flock)
        fd = os.open(out / LOCK, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # a third run finds it held
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
