"""Data at scale: headers only at start-up, broken files skipped when loaded, bad folders."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mobilenet import MobileNetError
from mobilenet.data import ImageFolder, folder_splits, header_problem, load_rgb
from mobilenet.data import images as images_module


def _folder(root: Path, classes=("a", "b"), per_class=4, size=12) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / c / f"{i}.jpg", quality=90)
    return root


def _truncate(path: Path) -> None:
    """Cut a JPEG in its pixel data, its header intact: only decoding finds it."""
    array = np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format="JPEG", quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught]


def test_a_truncated_file_passes_the_header_check_and_is_skipped_when_loaded(tmp_path):
    root = _folder(tmp_path / "data")
    _truncate(root / "a" / "1.jpg")
    (root / "b" / "text.jpg").write_text("not an image")  # found at start-up: no header
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolder(root, transform=lambda im: torch.tensor(im.size))
    assert [m for m in _messages(caught) if "skipped" in m] == [
        "skipped 1 unreadable image file(s): b/text.jpg (not an image)"
    ]
    assert len(dataset) == 8 and dataset.skipped == []  # the truncated file is still listed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, target = dataset[1]  # a/1.jpg is cut: the next sample, a/2.jpg, comes instead
    assert target == 0 and dataset.skipped == [root / "a" / "1.jpg"]
    assert "a/1.jpg" in _messages(caught)[0] and "1 skipped so far" in _messages(caught)[0]
    # The same index gives the same sample every time (an exact resume relies on it).
    assert torch.equal(dataset[1][0], dataset[2][0])
    assert "1 unreadable image(s) skipped: a/1.jpg" in dataset.skipped_line()


def test_skips_in_dataloader_workers_are_counted_in_the_main_process(tmp_path):
    root = _folder(tmp_path / "data", per_class=6)
    for name in ("a/0.jpg", "a/3.jpg", "b/5.jpg"):
        _truncate(root / name)
    dataset = ImageFolder(root, transform=lambda im: torch.zeros(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = DataLoader(dataset, batch_size=4, num_workers=2)
        batches = list(loader)
    assert sum(len(t) for _, t in batches) == 12  # every index answered, three replaced
    assert sorted(p.relative_to(root).as_posix() for p in dataset.skipped) == [
        "a/0.jpg",
        "a/3.jpg",
        "b/5.jpg",
    ]
    # The last sample wraps around to the first readable one.
    assert dataset[11][1] == 0


def test_header_verdicts_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    root = _folder(tmp_path / "data")
    (root / "a" / "empty.jpg").write_bytes(b"")
    checked = []
    real = images_module.check_headers

    def counting(paths, processes=None):
        checked.extend(Path(p).name for p in paths)
        return real(paths, processes)

    monkeypatch.setattr(images_module, "check_headers", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(ImageFolder(root)) == 8
        assert len(checked) == 8  # the empty file is known from its size, never opened
        checked.clear()
        assert len(ImageFolder(root)) == 8  # a second run reads the verdicts
        assert checked == []
        (root / "b" / "2.jpg").write_text("replaced by text")
        Image.new("RGB", (5, 5)).save(root / "b" / "new.png")
        dataset = ImageFolder(root)
    assert sorted(checked) == ["2.jpg", "new.png"]  # only the changed and the new file
    assert len(dataset) == 8 and root / "b" / "2.jpg" not in [p for p, _ in dataset.samples]


def test_two_processes_started_together_check_once(tmp_path):
    root = _folder(tmp_path / "data", per_class=3)
    script = (
        "import sys, warnings\n"
        "from mobilenet.data import images\n"
        "real = images.check_headers\n"
        "def counting(paths, processes=None):\n"
        "    print('checked', len(paths), flush=True)\n"
        "    return real(paths, processes)\n"
        "images.check_headers = counting\n"
        "from mobilenet.data import ImageFolder\n"
        "warnings.simplefilter('ignore')\n"
        "print('samples', len(ImageFolder(sys.argv[1])))\n"
    )
    env = {**os.environ, "MOBILENET_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, str(root)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [p.communicate(timeout=600)[0] for p in procs]  # a safety net only
    assert all(p.returncode == 0 for p in procs)
    assert all("samples 6" in out for out in outputs)
    assert sum(out.count("checked") for out in outputs) == 1  # the other read the cache


def test_bad_folders_are_refused_in_one_line(tmp_path):
    one = _folder(tmp_path / "one", classes=("cats",))
    with pytest.raises(MobileNetError, match=r"one class \(cats\).*at least two") as e:
        ImageFolder(one)
    assert "\n" not in str(e.value)
    ImageFolder(one, classes=["cats", "dogs"])  # evaluating one class of a model is fine
    with pytest.raises(MobileNetError, match="empty path"):
        ImageFolder("")
    with pytest.raises(MobileNetError, match="empty path"):
        folder_splits("", None, 0.1, lambda x: x, lambda x: x)
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(MobileNetError, match="is a file"):
        ImageFolder(tmp_path / "file.jpg")


def test_a_class_folder_without_readable_images_is_dropped(tmp_path):
    root = _folder(tmp_path / "data", classes=("a", "b", "c"))
    for path in (root / "b").iterdir():
        path.write_text("text")
    (root / "d").mkdir()  # no images at all
    (root / "d" / "notes.txt").write_text("ignored")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolder(root)
    assert dataset.classes == ["a", "c"] and sorted(set(dataset.targets)) == [0, 1]
    dropped = [m for m in _messages(caught) if "class folder" in m]
    assert len(dropped) == 1 and "left out 2 class folder(s)" in dropped[0]
    assert dropped[0].endswith(": b, d")
    # Only one class left with images: refused, as a one-class folder is.
    for path in (root / "c").iterdir():
        path.write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(MobileNetError, match=r"one class \(a\)"):
            ImageFolder(root)


def test_load_rgb_refuses_a_text_file_and_a_decompression_bomb(tmp_path, monkeypatch):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    with pytest.raises(MobileNetError, match=r"notes\.jpg: not a readable image") as e:
        load_rgb(text)
    assert "\n" not in str(e.value)
    with pytest.raises(MobileNetError, match="image not found"):
        load_rgb(tmp_path / "missing.png")
    Image.new("L", (40, 40)).save(tmp_path / "bomb.png")
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(1))
    for limit in (1000, 500):  # PIL warns above the limit and raises above twice it
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(MobileNetError, match=r"bomb.png: .*refused.*1600 pixels"):
            load_rgb(tmp_path / "bomb.png")
        assert header_problem(str(tmp_path / "bomb.png")) is not None
    assert decoded == []  # refused from the header: nothing was decoded


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    script = (
        "import sys\n"
        "from mobilenet import MobileNetError\n"
        "from mobilenet.data import load_rgb\n"
        "try:\n"
        "    load_rgb(sys.argv[1])\n"
        "except MobileNetError as e:\n"
        "    print(e)\n"
    )
    # In a child process with a timeout: a blocking open would hang the test run. (The
    # timeout is a safety net, long enough for a loaded machine to import torch.)
    result = subprocess.run(
        [sys.executable, "-c", script, str(fifo)], capture_output=True, text=True, timeout=600
    )
    expected = f"{fifo}: not a readable image (a FIFO, not a regular file)"
    assert result.stdout.strip() == expected, result.stderr
    # A FIFO in a class folder is not listed at all (the listing never opens it).
    root = _folder(tmp_path / "data")
    os.mkfifo(root / "a" / "pipe.jpg")
    assert len(ImageFolder(root)) == 8


def test_the_listing_keeps_the_order_of_a_sorted_glob(tmp_path):
    """Sample indices are unchanged from the sorted rglob listing: old runs resume exactly."""
    from mobilenet.data.images import is_image_file, list_folder

    for name in ("c1/b.jpg", "c1/b/c.jpg", "c1/a-x/z.png", "c1/a.jpg", "c1/B/q.jpg", "c2/x.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    old = [
        p.relative_to(tmp_path).as_posix()
        for d in ("c1", "c2")
        for p in sorted((tmp_path / d).rglob("*"))
        if p.is_file() and is_image_file(p)
    ]
    assert list_folder(tmp_path).names == old
