"""Tar shards: written from a folder, read back the same; split across ranks and workers;
a deterministic order per epoch; training and evaluation on them; one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from mobilenet.cli import main
from mobilenet.data.images import load_rgb
from mobilenet.data.shard_sets import eval_set
from mobilenet.data.shard_writer import write_shards
from mobilenet.data.shards import (
    CLASSES_FILE,
    ShardImages,
    ShardStream,
    is_shards,
    list_shards,
)
from mobilenet.errors import MobileNetError

pytest.importorskip("webdataset")

CLASSES = ("ant", "bee", "cow")
PER_CLASS = 12  # 36 readable images: divisible by 2 ranks, not by 5
QUICK = ["--model", "mobilenet_v3_small", "--resolution", "32", "--batch-size", "8", "--quiet"]


def _pixels(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """``root/<class>/<image>``: PNGs and JPEGs of random pixels, one truncated JPEG."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'jpg' if i % 2 else 'png'}")
    jpeg = (root / "bee" / "1.jpg").read_bytes()
    (root / "bee" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("shards")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = write_shards(folder, dst, shard_size=10)
    assert written.samples == 3 * PER_CLASS and written.skipped == 1
    assert [str(w.message) for w in caught if "truncated.jpg" in str(w.message)]
    return dst


def _pattern(dst: Path) -> str:
    return str(dst / "train-{000000..000003}.tar")


def _folder_samples(folder: Path) -> list[tuple[str, str]]:
    return sorted(
        (_pixels(load_rgb(p)), p.parent.name)
        for p in folder.rglob("*.*")
        if p.name != "truncated.jpg"
    )


def _stream(dataset: ShardStream, workers: int = 0) -> list[tuple[str, int]]:
    """Everything the dataset yields in this process, in order (no batch dropped)."""
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=list)
    return [(_pixels(image), label) for batch in loader for image, label in batch]


def test_shards_hold_the_folder_and_read_back_the_same(folder, shards):
    assert sorted(p.name for p in shards.iterdir()) == [
        CLASSES_FILE, "train-000000.tar", "train-000001.tar", "train-000002.tar",
        "train-000003.tar",
    ]  # fmt: skip
    index = json.loads((shards / CLASSES_FILE).read_text())
    assert index["classes"] == list(CLASSES)
    assert [v["samples"] for v in index["shards"].values()] == [10, 10, 10, 6]
    with tarfile.open(shards / "train-000000.tar") as tar:
        names = tar.getnames()
    assert {Path(n).suffix for n in names} <= {".cls", ".png", ".jpg"}

    expected = _folder_samples(folder)
    listed = list_shards(_pattern(shards))
    assert listed.samples == 36 and listed.classes == CLASSES
    streamed = _stream(ShardStream(listed, seed=0, rank=0, world_size=1))
    assert sorted((h, CLASSES[c]) for h, c in streamed) == expected
    images = ShardImages(list_shards(str(shards)))  # the folder form
    assert sorted((_pixels(images[i][0]), CLASSES[images[i][1]]) for i in range(36)) == expected


def test_two_ranks_of_two_workers_share_the_samples_out(shards):
    listed = list_shards(_pattern(shards))
    everything = set()
    for rank in range(2):
        dataset = ShardStream(listed, seed=3, batch_size=8, rank=rank, world_size=2)
        dataset.set_epoch(1)
        seen = _stream(dataset, workers=2)
        assert len(seen) == len(dataset) == 18 and len(set(seen)) == 18
        assert not everything & set(seen)
        everything |= set(seen)
        # Whole batches per worker: the batches the engine counts are the ones it gets.
        loader = DataLoader(dataset, 4, num_workers=2, collate_fn=list, drop_last=True)
        assert len(loader) == 4 == sum(1 for _ in loader)
    assert len(everything) == 36


def test_every_process_yields_as_many_the_remainder_left_out(shards):
    listed = list_shards(str(shards))
    seen = [_stream(ShardStream(listed, rank=r, world_size=5)) for r in range(5)]
    assert [len(s) for s in seen] == [7] * 5
    assert len(set().union(*map(set, seen))) == 35


def test_the_place_comes_from_torchrun_variables(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    dataset = ShardStream(list_shards(str(shards)))
    assert dataset.place() == (1, 4) and len(dataset) == 9


def test_the_order_is_fixed_by_seed_and_epoch(shards):
    listed = list_shards(str(shards))

    def order(epoch: int, seed: int = 0, workers: int = 0) -> list[tuple[str, int]]:
        dataset = ShardStream(listed, seed=seed, shuffle_buffer=8, batch_size=4)
        dataset.set_epoch(epoch)
        return _stream(dataset, workers)

    first = order(0)
    assert order(0) == first  # a resumed run sees the same data in the same order
    assert order(1) != first and sorted(order(1)) == sorted(first)
    assert order(0, seed=1) != first
    assert order(2, workers=2) == order(2, workers=2)


def test_a_broken_sample_is_replaced_and_the_count_kept(tmp_path, folder):
    """Shards from elsewhere: no counts in classes.json, one image that does not decode."""
    good = (folder / "ant" / "0.png").read_bytes()
    with tarfile.open(tmp_path / "part-0.tar", "w") as tar:
        for i, data in enumerate([good, b"garbage", good, good]):
            for ext, payload in (("png", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / CLASSES_FILE).write_text(json.dumps({"classes": ["x", "y"]}))
    dataset = ShardStream(list_shards(str(tmp_path / "part-0.tar")))
    with pytest.warns(UserWarning, match="1 sample"):
        assert len(_stream(dataset)) == len(dataset) == 4
    with pytest.raises(MobileNetError, match="does not decode"):
        [ShardImages(list_shards(str(tmp_path)))[i] for i in range(4)]


def test_validation_classes_follow_the_model(shards):
    images = eval_set(str(shards), classes=["cow", "bee", "ant", "dog"])
    assert sorted(set(images.targets)) == [0, 1, 2]
    with pytest.raises(MobileNetError, match="classes not in the model: ant"):
        eval_set(str(shards), classes=["bee", "cow"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{dst}/train-{{000000..000009}}.tar", "shard not found: "),
        ("{dst}/train-{{000000..000003.tar", "bad shard pattern"),
        ("{dst}/train-{{000000,000000}}.tar", "names a shard twice"),
        ("{dst}/nothing", "no .tar shards"),
        ("s3://bucket/train-{{0..3}}.tar", "local files"),
    ],
)
def test_bad_patterns_say_so_in_one_line(shards, tmp_path, data, message):
    (tmp_path / "nothing").mkdir()
    data = data.format(dst=shards if "nothing" not in data else tmp_path)
    with pytest.raises(MobileNetError, match=message) as e:
        list_shards(data)
    assert "\n" not in str(e.value)


def test_shards_without_their_class_list_are_refused(shards, tmp_path):
    (tmp_path / "train-000000.tar").write_bytes((shards / "train-000000.tar").read_bytes())
    assert is_shards(str(tmp_path)) and not is_shards(str(shards.parent))
    with pytest.raises(MobileNetError, match=f"no {CLASSES_FILE} in"):
        list_shards(str(tmp_path))


def test_the_shards_command(folder, tmp_path, capsys):
    dst = tmp_path / "out"
    assert main(["shards", str(folder), str(dst), "--shard-size", "20", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wrote 36 images of 3 classes in 2 shard(s), 1 unreadable" in out
    assert f"{dst}/train-{{000000..000001}}.tar" in out
    # Writing again needs --overwrite; a shorter set leaves no stale shard behind.
    assert main(["shards", str(folder), str(dst), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["shards", str(folder), str(dst), "--overwrite", "--quiet"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == [CLASSES_FILE, "train-000000.tar"]
    # Held-out shards beside them, under their own prefix.
    assert main(["shards", str(folder), str(dst), "--prefix", "val", "--quiet"]) == 0
    index = json.loads((dst / CLASSES_FILE).read_text())
    assert sorted(index["shards"]) == ["train-000000.tar", "val-000000.tar"]
    assert not list(dst.glob(".*"))  # no temporary file left
    capsys.readouterr()
    for args in ([str(tmp_path / "missing"), str(dst)], [str(folder), str(dst / CLASSES_FILE)]):
        assert main(["shards", *args, "--overwrite", "--quiet"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_val_fraction_needs_val_data_with_shards(shards, tmp_path, capsys):
    args = ["train", "--data", str(shards), "--val-fraction", "0.2", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "run"), *QUICK, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "--val-data" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_shards_are_one_line_and_no_run_folder(shards, tmp_path, capsys):
    missing = str(shards / "train-{000000..000009}.tar")
    assert main(["train", "--data", missing, "--out", str(tmp_path / "run"), *QUICK]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_train_on_a_shard_folder(shards, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(shards), "--val-data", str(shards), "--epochs", "1"]
    assert main([*args, "--out", str(out), *QUICK, "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_top1"] is not None
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2


@pytest.mark.slow
def test_train_and_eval_on_shard_patterns(shards, tmp_path, capsys):
    out, pattern = tmp_path / "run", _pattern(shards)
    args = ["train", "--data", pattern, "--val-data", pattern, "--epochs", "1"]
    code = main([*args, "--out", str(out), *QUICK, "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    metadata_classes = json.loads((out / "config.json").read_text())["train"]["classes"]
    assert metadata_classes == list(CLASSES)
    weights = str(out / "best.safetensors")
    code = main(["eval", "--weights", weights, "--data", pattern, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["images"] == 36
