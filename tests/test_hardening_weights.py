"""Weights and writers under adversity: URL-keyed, hash-checked downloads; NaN, Inf and
integer weights; OS errors of every writer as one line; no temporary file left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mobilenet import (
    CheckpointError,
    MobileNetError,
    create_model,
    fileio,
    load_weights,
    save_weights,
)
from mobilenet import weights as W
from mobilenet.cli import main
from mobilenet.export import export_onnx, export_torchscript
from mobilenet.models import pretrained as P

SMALL = "mobilenet_v3_small"


def _leftovers(folder: pathlib.Path) -> list[str]:
    """Every file under ``folder`` (temporary ones included), relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ downloads by URL


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Two different checkpoints served under the same file name, and a private cache."""
    monkeypatch.setenv("MOBILENET_HOME", str(tmp_path / "cache"))
    served = []
    for i, folder in enumerate(("a", "b")):
        torch.manual_seed(i)
        model = create_model(SMALL, num_classes=3)
        path = save_weights(model, tmp_path / "server" / folder / "model.safetensors")
        served.append((path, path.as_uri(), model))
    return served


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_urls_with_the_same_file_name_are_cached_apart(server):
    (_, url_a, model_a), (_, url_b, model_b) = server
    assert _same_weights(create_model(SMALL, weights=url_a), model_a)
    assert _same_weights(create_model(SMALL, weights=url_b), model_b)  # not a's cached file
    assert W.download(url_a) != W.download(url_b)
    assert W.download(url_a).name == "model.safetensors"  # the file keeps its name


@pytest.mark.parametrize("length", [8, 20, 64])
def test_a_url_with_the_right_hash_or_prefix_loads(server, length):
    path, url, model = server[0]
    digest = _sha(path)
    loaded = create_model(SMALL, weights=url, sha256=digest[:length].upper())
    assert _same_weights(loaded, model)


def test_a_url_with_a_wrong_hash_is_refused_and_leaves_nothing(server, tmp_path):
    path, url, _ = server[0]
    wrong = "0" * 64 if not _sha(path).startswith("0") else "1" * 64
    with pytest.raises(CheckpointError, match="does not match the expected"):
        create_model(SMALL, weights=url, sha256=wrong)
    assert _leftovers(tmp_path / "cache") == []


def test_a_cached_file_is_checked_each_time_it_is_reused(server):
    path, url, model = server[0]
    digest = _sha(path)
    cached = W.download(url, digest)
    cached.write_bytes(b"altered in the cache")
    # The altered copy is noticed, and the file fetched again.
    assert W.download(url, digest) == cached and _sha(cached) == digest
    assert _same_weights(create_model(SMALL, weights=url, sha256=digest), model)
    # A server whose file changed is refused, and the cached copy is not replaced by it.
    path.write_bytes(b"changed on the server")
    cached.write_bytes(b"altered again")
    with pytest.raises(CheckpointError, match="does not match"):
        W.download(url, digest)
    assert cached.read_bytes() == b"altered again"
    assert [p.name for p in cached.parent.iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("bad", ["", "abc", "xyz12345", "0" * 65, "sha256 0123456789"])
def test_a_malformed_hash_is_refused(server, bad):
    with pytest.raises(MobileNetError, match="hexadecimal"):
        create_model(SMALL, weights=server[0][1], sha256=bad)


def test_a_local_file_is_checked_when_a_hash_is_given(server):
    path, _, model = server[0]
    assert _same_weights(create_model(SMALL, weights=str(path), sha256=_sha(path)[:12]), model)
    with pytest.raises(CheckpointError, match="does not match"):
        create_model(
            SMALL, weights=str(path), sha256="f" * 12 if _sha(path)[0] != "f" else "0" * 12
        )


def test_an_unreachable_url_is_one_line(tmp_path, server):
    with pytest.raises(CheckpointError, match="could not download") as info:
        W.download((tmp_path / "nowhere.safetensors").as_uri())
    assert "\n" not in str(info.value)
    assert _leftovers(tmp_path / "cache") == []


def test_official_keys_keep_their_hash_and_their_place_in_the_cache(server, monkeypatch, tmp_path):
    path, url, model = server[0]
    digest = _sha(path)
    monkeypatch.setitem(P.PRETRAINED, "small.test", P.Pretrained(SMALL, url, digest[:8], 0.0))
    assert _same_weights(create_model(SMALL, weights="small.test"), model)
    assert _leftovers(tmp_path / "cache") == ["model.safetensors"]
    # Its URL given as such is the official file too; a longer, agreeing hash is checked.
    assert P.resolve_weights(url, digest) == tmp_path / "cache" / "model.safetensors"
    with pytest.raises(CheckpointError, match="not the expected"):
        create_model(SMALL, weights="small.test", sha256="f" * 8 if digest[0] != "f" else "0" * 8)


# ---------------------------------------------------------- values that cannot be used


def _poisoned(change) -> dict[str, torch.Tensor]:
    state = create_model(SMALL, num_classes=3).state_dict()
    change(state)
    return state


def _nan(key):
    return lambda s: s[key].view(-1)[0].fill_(float("nan"))


def _inf(key):
    return lambda s: s[key].view(-1)[-1].fill_(float("-inf"))


def _as(key, dtype):
    return lambda s: s.__setitem__(key, s[key].to(dtype))


def _many_nan(s):
    for key in [k for k in s if k.endswith(".weight")][:7]:
        s[key].fill_(float("nan"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_nan("features.0.conv.weight"), r"1 with NaN or Inf values: features\.0\.conv\.weight"),
        (_inf("features.0.bn.running_var"), r"NaN or Inf values: features\.0\.bn\.running_var"),
        (
            _as("classifier.weight", torch.int64),
            r"not floating point: classifier\.weight \(int64\)",
        ),
        (
            _as("features.0.bn.weight", torch.bool),
            r"not floating point: features\.0\.bn\.weight \(bool\)",
        ),
        (_as("features.0.bn.weight", torch.int8), r"\(int8\)"),
        (_many_nan, r"7 with NaN or Inf values: .*, \.\.\. \(2 more\)"),
    ],
)
def test_unusable_values_are_refused_naming_them_and_loading_nothing(change, message):
    model = create_model(SMALL, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message) as info:
        load_weights(model, _poisoned(change))
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_integer_batchnorm_counters_and_half_precision_still_load():
    state = create_model(SMALL, num_classes=3).state_dict()
    assert state["features.0.bn.num_batches_tracked"].dtype == torch.int64
    load_weights(create_model(SMALL, num_classes=3), state)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    load_weights(create_model(SMALL, num_classes=3), half)


def test_a_file_with_nan_weights_is_refused_by_create_model(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file(_poisoned(_nan("features.0.conv.weight")), str(path))
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        create_model(SMALL, weights=str(path))


# ------------------------------------------------------------------ atomic writes


def _raising(code: int):
    """A write that puts half a file down, then fails as the OS would."""

    def write(tmp: pathlib.Path) -> None:
        tmp.write_bytes(b"half a file")
        raise OSError(code, os.strerror(code))

    return write


@pytest.mark.parametrize(
    "code", [errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EIO]
)
def test_os_errors_of_a_write_are_one_line_and_leave_the_old_file(tmp_path, code):
    target = tmp_path / "runs" / "x.onnx"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(MobileNetError) as info:
        fileio.atomic_write(target, _raising(code))
    assert str(info.value) == f"cannot write {target}: {os.strerror(code)}"
    assert _leftovers(tmp_path) == ["runs/x.onnx"] and target.read_text() == "old"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_folder_that_refuses_the_temporary_file(tmp_path, monkeypatch, code):
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fileio.os, "open", refusing)
    called = []
    with pytest.raises(MobileNetError, match=f"^cannot write .*x.json: {os.strerror(code)}$"):
        fileio.atomic_write(tmp_path / "x.json", called.append)
    assert called == [] and _leftovers(tmp_path) == []


def test_a_failing_rename_removes_the_temporary_file(tmp_path, monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(MobileNetError, match="cannot write"):
        fileio.write_json(tmp_path / "x.json", {"a": 1})
    assert _leftovers(tmp_path) == []


def test_a_folder_is_refused_before_writing(tmp_path):
    target = tmp_path / "out.onnx"
    (target / "inside").mkdir(parents=True)
    called = []
    with pytest.raises(MobileNetError, match=r"out\.onnx: it is a folder$"):
        fileio.atomic_write(target, called.append)
    assert called == [] and (target / "inside").is_dir()


@pytest.mark.parametrize("below", ["x.onnx", "sub/x.onnx"])
def test_a_path_inside_a_file_is_refused(tmp_path, below):
    blocker = tmp_path / "model.safetensors"
    blocker.write_text("a file")
    with pytest.raises(MobileNetError, match=r"model\.safetensors is a file, not a folder$"):
        fileio.write_json(blocker / below, {})
    assert _leftovers(tmp_path) == ["model.safetensors"]


def test_names_too_long(tmp_path):
    with pytest.raises(MobileNetError, match=r"File name too long$"):
        fileio.write_json(tmp_path / ("n" * 300 + ".json"), {})
    with pytest.raises(MobileNetError, match=r"File name too long$"):
        fileio.write_json(tmp_path / ("d" * 300) / "x.json", {})
    longest = tmp_path / ("n" * 250 + ".json")  # fits, though its temporary name is longer
    fileio.write_json(longest, {"ok": True})
    assert _leftovers(tmp_path) == [longest.name]


def test_other_errors_pass_unchanged_and_the_mode_follows_the_umask(tmp_path):
    def failing(tmp):
        raise MobileNetError("the check failed")

    with pytest.raises(MobileNetError, match=r"^the check failed$"):
        fileio.atomic_write(tmp_path / "x", failing)
    assert _leftovers(tmp_path) == []
    umask = os.umask(0o022)
    try:
        fileio.write_bytes(tmp_path / "y", b"data")
    finally:
        os.umask(umask)
    assert (tmp_path / "y").stat().st_mode & 0o777 == 0o644


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "x.onnx"
    dead, alive = _dead_pid(), os.getpid()
    names = {
        "dead": f".x.onnx.{dead}.0123abcd.tmp",
        "alive": f".x.onnx.{alive}.0123abcd.tmp",  # a write in progress: kept
        "other target": f".y.onnx.{dead}.0123abcd.tmp",  # another file's: left to its writes
        "not ours": f".x.onnx.{dead}.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("partial")
    fileio.write_bytes(target, b"new")
    kept = {p.name for p in tmp_path.iterdir()}
    assert names["dead"] not in kept
    assert {names["alive"], names["other target"], names["not ours"], "x.onnx"} == kept


def test_a_killed_writer_leaves_nothing_after_the_next_write(tmp_path):
    target = tmp_path / "model.pt"
    # The child imports fileio alone (an empty package around it): quick, and no torch.
    package = str(pathlib.Path(fileio.__file__).parent)
    code = (
        "import sys, time, types\n"
        "package = types.ModuleType('mobilenet')\n"
        f"package.__path__ = [{package!r}]\n"
        "sys.modules['mobilenet'] = package\n"
        "from mobilenet.fileio import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_bytes(b'half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(600)\n"
        f"atomic_write({str(target)!r}, write)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait()
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 1
    fileio.write_bytes(target, b"whole")
    assert _leftovers(tmp_path) == ["model.pt"] and target.read_bytes() == b"whole"


# ------------------------------------------------------- writers on a full disk


def _half_then_full(self: pathlib.Path, data: bytes) -> int:
    """Python's file writes put half the data down, then find the disk full."""
    with open(self, "wb") as f:
        f.write(bytes(data)[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    monkeypatch.setattr(pathlib.Path, "write_bytes", _half_then_full)


def _model():
    return create_model(SMALL, num_classes=3).eval()


@pytest.mark.parametrize(
    "writer",
    [
        lambda path: export_torchscript(_model(), path, 64),
        lambda path: export_onnx(_model(), path, 64),
        lambda path: save_weights(_model(), path),
    ],
    ids=["torchscript", "onnx", "safetensors"],
)
def test_writers_on_a_full_disk_raise_one_error_and_leave_nothing(tmp_path, full_disk, writer):
    target = tmp_path / "out" / "model.bin"
    with pytest.raises(MobileNetError) as info:
        writer(target)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert _leftovers(tmp_path) == []


def test_export_cli_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    weights = save_weights(_model(), tmp_path / "w.safetensors")  # before the disk fills
    monkeypatch.setattr(pathlib.Path, "write_bytes", _half_then_full)
    out = tmp_path / "m.pt"
    args = ["export", "--model", SMALL, "--weights", str(weights), "--out", str(out)]
    assert main([*args, "--format", "torchscript", "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert err == f"mobilenet export: error: cannot write {out}: No space left on device\n"
    assert _leftovers(tmp_path) == ["w.safetensors"]


def test_a_failed_write_leaves_no_folder_it_made(tmp_path):
    with pytest.raises(MobileNetError, match=r"No space left on device$"):
        fileio.atomic_write(tmp_path / "runs" / "new" / "x.onnx", _raising(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []
