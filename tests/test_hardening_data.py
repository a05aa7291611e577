"""Data that cannot be right is refused in one line (or warned about and counted), and
Keras files cannot make the reader read other files or allocate without bound.

* tar shards: a stored class outside the shards' classes (``-1`` read as the last one);
* ``mobilenet shards``: all or nothing on a full disk;
* segmentation masks: 16-bit masks without a declared class count, values beyond the
  declared classes, masks with no labelled pixel;
* Keras HDF5: arrays declaring more than their file can hold, external storage, virtual
  datasets, links to other files; ``.keras`` members declaring a bomb.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet.data import shard_writer
from mobilenet.data.datasets import TensorImages
from mobilenet.data.shard_sets import eval_set
from mobilenet.data.shards import CLASSES_FILE, ShardStream, list_shards
from mobilenet.errors import CheckpointError, MobileNetError
from mobilenet.segmentation.data import IGNORE, SegmentationFolder

from .helpers import mobilenet_command

h5py = pytest.importorskip("h5py")


def _one_line_refusal(result: subprocess.CompletedProcess, command: str, *parts: str) -> None:
    """Exit status 2 and one ``mobilenet COMMAND: error: ...`` line holding ``parts``."""
    err = result.stderr.strip()
    assert result.returncode == 2, result.stderr
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"mobilenet {command}: error: "), err
    for part in parts:
        assert part in err, err


def _png(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- shard labels


def _shard(folder: Path, classes: list[bytes], names: tuple[str, ...] = ("x", "y")) -> Path:
    """``folder/part-0.tar``: one PNG per entry of ``classes`` (the ``.cls`` bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.tar"
    with tarfile.open(path, "w") as tar:
        for i, cls in enumerate(classes):
            for ext, payload in (("png", _png(i)), ("cls", cls)):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (folder / CLASSES_FILE).write_text(json.dumps({"classes": list(names)}))
    return path


@pytest.mark.parametrize("stored", [b"-1", b"2", b" 7\n"])
def test_a_shard_class_outside_its_classes_is_refused(tmp_path, stored):
    shard = _shard(tmp_path, [b"0", b"1", stored, b"0"])
    with pytest.raises(MobileNetError) as evaluation:
        eval_set(str(tmp_path))  # what `mobilenet eval` reads: it scored 100% on -1
    stream = ShardStream(list_shards(str(tmp_path)), batch_size=2)
    with pytest.raises(MobileNetError) as training:
        list(stream)
    for error in (evaluation, training):
        message = str(error.value)
        assert message.startswith(f"{shard}: sample s002 has class {int(stored)}, not one of")
        assert "\n" not in message and "2 classes" in message


def test_labels_of_built_in_sets_are_checked_against_their_classes():
    images = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    assert TensorImages(images, torch.tensor([0, 1, 1]), ["a", "b"]).targets == [0, 1, 1]
    for bad in (-1, 2):
        with pytest.raises(MobileNetError, match=f"labels hold {bad}, not one of the 2"):
            TensorImages(images, torch.tensor([0, bad, 1]), ["a", "b"])


@pytest.mark.parametrize("workers", ["0", "1"])  # 1: raised in a DataLoader worker
def test_training_on_a_shard_with_class_minus_one_is_one_line(tmp_path, workers):
    pytest.importorskip("webdataset")
    shard = _shard(tmp_path / "shards", [str(i % 2).encode() for i in range(7)] + [b"-1"])
    out = tmp_path / "run"
    result = mobilenet_command(
        "train", "--data", str(tmp_path / "shards"), "--model", "mobilenet_v3_small",
        "--width-mult", "0.25", "--resolution", "32", "--batch-size", "4", "--epochs", "1",
        "--workers", workers, "--quiet", "--out", str(out),
    )  # fmt: skip
    _one_line_refusal(result, "train", f"{shard}: sample s007 has class -1")
    assert not out.exists()


# --------------------------------------------------------------------------- shard writing


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f"{i}.png").write_bytes(_png(10 * c + i, 8))
    return root


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> the SHA-256 of its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


def _full_disk_at(monkeypatch, name: str) -> None:
    """The disk fills while the file that is to become ``name`` is written: half its
    bytes go down, then ENOSPC, as Python's writes report it."""
    original = shard_writer._write_staged

    def write_staged(path: Path, final: Path, write) -> None:
        if final.name != name:
            return original(path, final, write)

        def half_then_full(f) -> None:
            buffer = io.BytesIO()
            write(buffer)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return original(path, final, half_then_full)

    monkeypatch.setattr(shard_writer, "_write_staged", write_staged)


@pytest.mark.parametrize("fails", [CLASSES_FILE, "train-000002.tar"])
def test_a_full_disk_leaves_no_shards_and_no_folder(image_folder, tmp_path, monkeypatch, fails):
    pytest.importorskip("webdataset")
    _full_disk_at(monkeypatch, fails)
    dst = tmp_path / "new" / "shards"
    with pytest.raises(MobileNetError) as error:
        shard_writer.write_shards(image_folder, dst, shard_size=4, workers=1)
    assert str(error.value) == f"cannot write {dst / fails}: No space left on device"
    assert not (tmp_path / "new").exists()


def test_a_full_disk_leaves_an_earlier_write_as_it_was(image_folder, tmp_path, monkeypatch):
    pytest.importorskip("webdataset")
    dst = tmp_path / "shards"
    shard_writer.write_shards(image_folder, dst, shard_size=4, workers=1)
    shard_writer.write_shards(image_folder, dst, prefix="val", shard_size=6, workers=1)
    before = _tree(dst)
    assert len([name for name in before if name.endswith(".tar")]) == 5
    for fails in ("train-000003.tar", CLASSES_FILE):  # a longer write, over the old one
        monkeypatch.undo()
        _full_disk_at(monkeypatch, fails)
        with pytest.raises(MobileNetError, match="No space left on device"):
            shard_writer.write_shards(image_folder, dst, shard_size=3, overwrite=True, workers=1)
        assert _tree(dst) == before
    assert len(list_shards(str(dst / "train-{000000..000002}.tar")).shards) == 3


def test_staging_folders_of_dead_writers_are_removed(image_folder, tmp_path):
    pytest.importorskip("webdataset")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dst = tmp_path / "shards"
    dead = dst / f".train-shards.{child.pid}.0123abcd.tmp"
    alive = dst / f".train-shards.{os.getpid()}.0123abcd.tmp"  # a write in progress
    for folder in (dead, alive):
        folder.mkdir(parents=True)
        (folder / "train-000000.tar").write_bytes(b"partial")
    shard_writer.write_shards(image_folder, dst, workers=1)
    assert not dead.exists() and alive.exists()
    assert sorted(p.name for p in dst.iterdir() if not p.name.startswith(".")) == [
        CLASSES_FILE,
        "train-000000.tar",
    ]


_FULL_DISK_RUN = """\
import errno, os, sys
from mobilenet.cli import main
from mobilenet.data import shard_writer

original = shard_writer._write_staged

def full(f):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def write_staged(path, final, write):
    return original(path, final, full if final.name == sys.argv[1] else write)

shard_writer._write_staged = write_staged
sys.exit(main(sys.argv[2:]))
"""


def test_the_shards_command_on_a_full_disk_is_one_line(image_folder, tmp_path):
    pytest.importorskip("webdataset")
    dst = tmp_path / "shards"
    args = ["shards", str(image_folder), str(dst), "--shard-size", "5", "--quiet"]
    result = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_RUN, "train-000001.tar", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    message = f"cannot write {dst / 'train-000001.tar'}: No space left on device"
    _one_line_refusal(result, "shards", message)
    assert not dst.exists()


# --------------------------------------------------------------------------- masks


def _seg_folder(root: Path, masks: list[np.ndarray], names: list[str] | None = None) -> Path:
    """``images/`` + ``masks/`` with the given masks (uint16 arrays become 16-bit PNGs)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, mask in enumerate(masks):
        Image.new("RGB", (mask.shape[1], mask.shape[0])).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    if names is not None:
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def _bands(values: list[int], dtype=np.uint8, size: tuple[int, int] = (8, 12)) -> np.ndarray:
    """A mask of vertical bands, one per value."""
    h, w = size
    return np.repeat(np.array(values)[np.arange(w) * len(values) // w][None], h, 0).astype(dtype)


def test_16_bit_masks_without_a_class_count_are_refused(tmp_path):
    root = _seg_folder(tmp_path / "data", [_bands([0, 1000, 2000], np.uint16)] * 2)
    assert Image.open(root / "masks" / "0.png").mode == "I;16"
    with pytest.raises(MobileNetError) as error:
        SegmentationFolder(root)  # was: 2,001 classes, 255 both a class and "ignore"
    message = str(error.value)
    assert message.startswith(f"{root / 'masks' / '0.png'}: a 16-bit mask (2 in {root})")
    assert "--num-classes" in message and "\n" not in message


def test_16_bit_masks_with_a_class_count(tmp_path):
    small = _seg_folder(tmp_path / "small", [_bands([0, 1, 2, IGNORE], np.uint16)] * 2)
    assert SegmentationFolder(small, num_classes=3).classes == ["0", "1", "2"]
    named = _seg_folder(tmp_path / "named", [_bands([0, 1, 2], np.uint16)] * 2, ["a", "b", "c"])
    assert SegmentationFolder(named).classes == ["a", "b", "c"]
    scaled = _seg_folder(tmp_path / "scaled", [_bands([0, 1000, 2000], np.uint16)] * 2)
    with pytest.raises(MobileNetError) as error:
        SegmentationFolder(scaled, num_classes=3)
    assert str(error.value) == (
        f"{scaled / 'masks' / '0.png'}: holds the value 2000, which is neither one of the 3 "
        f"classes (0 to 2) nor 255 (ignored); 2 mask(s) in {scaled} do"
    )


def test_a_value_beyond_the_declared_classes_is_refused(tmp_path):
    masks = [_bands([0, 1, 2]), _bands([0, 7, 2]), _bands([1, 2])]
    root = _seg_folder(tmp_path / "data", masks, ["a", "b", "c"])
    with pytest.raises(MobileNetError) as error:
        SegmentationFolder(root)
    assert str(error.value) == (
        f"{root / 'masks' / '1.png'}: holds the value 7, which is neither one of the 3 "
        f"classes (0 to 2) nor 255 (ignored); 1 mask(s) in {root} do"
    )


@pytest.mark.parametrize(
    ("num_classes", "names", "message"),
    [
        (256, None, "--num-classes 256: a segmentation model has 2 to 255 classes"),
        (1, None, "--num-classes 1: a segmentation model has 2 to 255 classes"),
        (4, ["a", "b", "c"], "--num-classes 4, but the classes are 3 (a, b, c)"),
    ],
)
def test_a_bad_class_count_is_one_line(tmp_path, num_classes, names, message):
    root = _seg_folder(tmp_path / "data", [_bands([0, 1, 2])] * 2, names)
    with pytest.raises(MobileNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SegmentationFolder(root, num_classes=num_classes)


def test_masks_without_a_labelled_pixel_are_counted_in_one_warning(tmp_path):
    empty = np.full((8, 12), IGNORE, np.uint8)
    masks = [_bands([0, 1, 2]), empty, _bands([2, 1]), empty, empty]
    root = _seg_folder(tmp_path / "data", masks, ["a", "b", "c"])
    with pytest.warns(UserWarning) as caught:
        dataset = SegmentationFolder(root)
    assert len(dataset) == 5 and len(dataset.unlabelled) == 3  # kept: they cost nothing
    assert [str(w.message) for w in caught] == [
        f"{root}: 3 of 5 mask(s) have no labelled pixel (all 255, ignored) and add "
        "nothing, e.g. masks/1.png"
    ]


def test_a_folder_of_unlabelled_masks_is_refused(tmp_path):
    root = _seg_folder(tmp_path / "data", [np.full((8, 12), IGNORE, np.uint8)] * 3)
    with pytest.raises(MobileNetError, match=r"no mask has a labelled pixel .* masks/0.png"):
        SegmentationFolder(root)  # was: training at loss 0.0


def test_training_on_16_bit_masks_is_one_line(tmp_path):
    root = _seg_folder(tmp_path / "data", [_bands([0, 1000, 2000], np.uint16)] * 2)
    out = tmp_path / "run"
    result = mobilenet_command(
        "train", "--model", "lraspp_mobilenet_v3_small", "--width-mult", "0.35",
        "--data", str(root), "--resolution", "32", "--epochs", "1", "--batch-size", "2",
        "--workers", "0", "--quiet", "--out", str(out),
    )  # fmt: skip
    _one_line_refusal(result, "train", "a 16-bit mask", str(root / "masks" / "0.png"))
    assert not out.exists()


def test_training_on_16_bit_masks_with_num_classes(tmp_path):
    root = _seg_folder(tmp_path / "data", [_bands([0, 1, 2, IGNORE], np.uint16)] * 2)
    out = tmp_path / "run"
    result = mobilenet_command(
        "train", "--model", "lraspp_mobilenet_v3_small", "--width-mult", "0.35",
        "--data", str(root), "--resolution", "32", "--epochs", "1", "--batch-size", "2",
        "--workers", "0", "--quiet", "--out", str(out), "--num-classes", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["train"]["num_classes"] == 3


# --------------------------------------------------------------------------- Keras files


def _keras3(path: Path, fill) -> Path:
    """A Keras 3 ``.weights.h5`` with one layer, ``dense``; ``fill(vars_group)`` adds
    its variables."""
    with h5py.File(path, "w") as f:
        variables = f.create_group("layers/dense/vars")
        variables.attrs["name"] = "dense"
        fill(variables)
    return path


def _read(path: Path):
    from mobilenet.weights.keras import read_keras

    return read_keras(path)


def _huge_raw(v):  # storage never written: HDF5 reads the fill value, 4 TiB of it
    v.create_dataset("0", shape=(262144, 262144, 16), dtype="f4")


def _huge_compressed(v):
    v.create_dataset("0", shape=(1 << 20, 1 << 20), dtype="f4", chunks=(64, 64), compression=4)


def _outside(folder: Path) -> Path:
    secret = folder / "secret.bin"
    secret.write_bytes(np.arange(16, dtype="f4").tobytes())
    return secret


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (_huge_raw, "dense/0 declares a 262144x262144x16 float32 array of 4,398,046,511,104 "
                    "bytes, with 0 bytes stored in a file of"),
        (_huge_compressed, "dense/0 declares a 1048576x1048576 float32 array of "
                           "4,398,046,511,104 bytes, with 0 bytes compressed"),
    ],
    ids=["raw", "compressed"],
)  # fmt: skip
def test_arrays_declaring_more_than_the_file_holds_are_refused(tmp_path, fill, message):
    path = _keras3(tmp_path / "huge.weights.h5", fill)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(CheckpointError) as error:
        _read(path)  # was: MemoryError (a traceback), or gigabytes allocated
    assert str(error.value).startswith(f"{path}: {message}"), str(error.value)
    assert str(error.value).endswith("it cannot be a weight; refused")


def test_each_array_and_all_together_are_bounded(tmp_path, monkeypatch):
    from mobilenet.weights import keras

    def fill(v):
        for i in range(3):
            v.create_dataset(str(i), data=np.ones((64, 64), "f4"))

    path = _keras3(tmp_path / "many.weights.h5", fill)
    assert len(_read(path)[0]) == 3
    with monkeypatch.context() as patch:  # as if 16 KiB were more than any MobileNet holds
        patch.setattr(keras, "MAX_ARRAY_BYTES", 64 * 64 * 4 - 1)
        with pytest.raises(CheckpointError, match="dense/0 declares a 64x64 float32 array"):
            _read(path)
    monkeypatch.setattr(keras, "MAX_WEIGHTS_BYTES", 2 * 64 * 64 * 4)
    with pytest.raises(CheckpointError, match="arrays declare more than 32,768 bytes in all"):
        _read(path)


def test_an_array_under_two_names_is_refused(tmp_path):
    def fill(v):
        v["0"] = np.ones(4, "f4")
        v["1"] = v["0"]  # a hard link: one array, allocated once per name

    with pytest.raises(CheckpointError, match=r"dense/1 is the same array as dense/0; refused"):
        _read(_keras3(tmp_path / "twice.weights.h5", fill))


def test_external_storage_is_refused(tmp_path):
    secret = _outside(tmp_path)

    def fill(v):
        v.create_dataset("0", shape=(16,), dtype="f4", external=[(str(secret), 0, 64)])

    path = _keras3(tmp_path / "external.weights.h5", fill)
    with pytest.raises(CheckpointError) as error:
        _read(path)  # was: the bytes of secret.bin, as a "weight"
    assert str(error.value) == (
        f"{path}: dense/0 keeps its data in another file ({secret}); refused"
    )


def test_virtual_datasets_are_refused(tmp_path):
    with h5py.File(tmp_path / "source.h5", "w") as f:
        f["x"] = np.ones(4, "f4")

    def fill(v):
        layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
        layout[:] = h5py.VirtualSource(str(tmp_path / "source.h5"), "x", shape=(4,))
        v.create_virtual_dataset("0", layout)

    path = _keras3(tmp_path / "virtual.weights.h5", fill)
    with pytest.raises(CheckpointError, match=r"dense/0 is a virtual dataset .*; refused$"):
        _read(path)


def _other_file(tmp_path: Path) -> Path:
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.ones(4, "f4")
        f.create_group("g/vars").attrs["name"] = "dense"
        f["g/vars/0"] = np.ones(3, "f4")
    return other


def test_links_to_other_files_are_refused_wherever_they_are(tmp_path):
    other = _other_file(tmp_path)
    cases = {
        "array": lambda f: f.create_group("layers/dense/vars").__setitem__(
            "0", h5py.ExternalLink(str(other), "/x")
        ),
        "layer": lambda f: f.create_group("layers").__setitem__(
            "dense", h5py.ExternalLink(str(other), "/g")
        ),
        "soft, through one": lambda f: (
            f.__setitem__("elsewhere", h5py.ExternalLink(str(other), "/g")),
            f.create_group("layers").__setitem__("dense", h5py.SoftLink("/elsewhere")),
        ),
        "legacy": lambda f: (
            f.attrs.__setitem__("layer_names", [b"conv"]),
            f.__setitem__("conv", h5py.ExternalLink(str(other), "/g")),
        ),
    }
    for name, build in cases.items():
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w") as f:
            build(f)
        with pytest.raises(CheckpointError, match=r"links to another file \(.*other.h5\)"):
            _read(path)


def test_soft_links_inside_the_file_are_followed_and_loops_refused(tmp_path):
    def inside(v):
        v.parent.parent.parent["stored"] = np.arange(3, dtype="f4")
        v["0"] = h5py.SoftLink("/stored")

    state_dict, _ = _read(_keras3(tmp_path / "soft.weights.h5", inside))
    assert torch.equal(state_dict["dense/0"], torch.arange(3.0))

    def loop(v):
        v["0"] = h5py.SoftLink("/layers/dense/vars/1")
        v["1"] = h5py.SoftLink("/layers/dense/vars/0")

    with pytest.raises(CheckpointError, match="more than 8 soft links to follow; refused"):
        _read(_keras3(tmp_path / "loop.weights.h5", loop))


def _keras_zip(path: Path, weights: bytes, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", json.dumps({"config": {"name": "tiny"}}))
        z.writestr("model.weights.h5", weights)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def _tiny_weights(folder: Path) -> bytes:
    path = _keras3(folder / "tiny.weights.h5", lambda v: v.__setitem__("0", np.ones(3, "f4")))
    return path.read_bytes()


def _declare_size(path: Path, member: str, size: int) -> None:
    """Rewrite the uncompressed size ``member`` declares, in its local and central headers."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    with zipfile.ZipFile(path) as z:
        local = z.getinfo(member).header_offset
    struct.pack_into("<I", data, local + 22, size)
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:  # central directory entries
        length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46 : start + 46 + length] == name:
            struct.pack_into("<I", data, start + 24, size)
        start += 4
    path.write_bytes(bytes(data))


def test_a_keras_zip_member_declaring_a_bomb_is_refused(tmp_path):
    path = _keras_zip(tmp_path / "bomb.keras", _tiny_weights(tmp_path))
    _declare_size(path, "model.weights.h5", 0xFFFFFFF0)  # 4 GB from a few hundred bytes
    with pytest.raises(CheckpointError, match=r"model.weights.h5 declares 4,294,967,280 bytes"):
        _read(path)


def test_keras_zip_members_are_read_by_name_and_nothing_is_extracted(tmp_path):
    folder = tmp_path / "inside"
    folder.mkdir()
    escape = {"../escaped.txt": b"x", "/tmp/absolute.txt": b"y"}
    path = _keras_zip(folder / "model.keras", _tiny_weights(tmp_path), escape)
    before = _tree(tmp_path)
    state_dict, metadata = _read(path)
    assert list(state_dict) == ["dense/0"] and metadata["keras_model"] == "tiny"
    assert _tree(tmp_path) == before


def test_convert_refuses_in_one_line(tmp_path):
    path = _keras3(tmp_path / "huge.weights.h5", _huge_raw)
    dst = tmp_path / "out.safetensors"
    result = mobilenet_command("convert", str(path), str(dst), "--model", "mobilenet_v2")
    _one_line_refusal(result, "convert", str(path), "declares a 262144x262144x16 float32 array")
    assert not dst.exists()
