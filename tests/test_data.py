"""Data: every image mode becomes RGB, broken files are skipped, built-in sets work offline."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet import MobileNetError
from mobilenet.data import ImageFolder, builtin_splits, find_broken, load_rgb, to_rgb


def _rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_greyscale_and_one_bit():
    grey = Image.fromarray(np.full((4, 4), 77, np.uint8), mode="L")
    assert (_rgb(grey) == 77).all()
    assert (_rgb(Image.new("1", (4, 4), 1)) == 255).all()


def test_sixteen_bit_greyscale_uses_the_full_range():
    array = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    image = Image.fromarray(array)  # mode I;16
    assert image.mode.startswith("I;16")
    out = _rgb(image)
    assert out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 128, 255, 4]  # scaled, not clipped at 255


def test_rgba_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent blue: invisible
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    out = _rgb(Image.fromarray(rgba, mode="RGBA")).astype(int)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert abs(out[1, 0, 0] - 127) <= 1


def test_palette_with_and_without_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert [tuple(c) for c in _rgb(p)[0]] == [(0, 255, 0), (10, 20, 30)]
    p.info["transparency"] = 0
    assert [tuple(c) for c in _rgb(p)[0]] == [(255, 255, 255), (10, 20, 30)]


def test_cmyk():
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert tuple(_rgb(cmyk)[0, 0]) == (255, 0, 0)


def _make_folder(root, classes=("a", "b"), per_class=6, size=12):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / c / f"{i}.png")
    return root


def test_broken_files_are_skipped_at_start_up_or_when_loaded(tmp_path):
    root = _make_folder(tmp_path / "data")
    good = (root / "a" / "0.png").read_bytes()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "a" / "big.jpg", quality=90)
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "b" / "notes.png").write_text("not an image")
    (root / "b" / "cut.png").write_bytes(good[: len(good) // 2])  # header intact
    (root / "b" / "readme.txt").write_text("ignored: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ImageFolder(root)
    messages = [str(w.message) for w in caught]
    # Headers only at start-up: what has no readable header is left out, in one line.
    assert messages == [
        "skipped 2 unreadable image file(s): b/empty.png (empty file), b/notes.png (not an image)"
    ]
    assert len(dataset) == 14 and dataset.classes == ["a", "b"]
    # The cut PNG is found when loaded: its place is taken by the next sample.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = [dataset[i][1] for i in range(len(dataset))]
    assert dataset.skipped == [root / "b" / "cut.png"] and len(loaded) == 14
    assert set(find_broken([root / "a" / "big.jpg", root / "b" / "empty.png"])) == {
        root / "b" / "empty.png"
    }


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(MobileNetError, match="not found"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(MobileNetError, match="no class sub-folders"):
        ImageFolder(tmp_path)


def test_validation_folder_must_use_known_classes(tmp_path):
    root = _make_folder(tmp_path / "val", classes=("a", "zebra"))
    with pytest.raises(MobileNetError, match="zebra"):
        ImageFolder(root, classes=["a", "b"])
    assert ImageFolder(root, classes=["zebra", "a", "b"]).targets[0] == 1


@pytest.mark.parametrize(("name", "train", "val"), [("mnist", 4000, 1000), ("digits", 1500, 297)])
def test_builtin_datasets(name, train, val):
    split = builtin_splits(name, lambda x: x, lambda x: x)
    assert (len(split.train), len(split.val)) == (train, val)
    image, label = split.val[0]
    assert image.shape[0] == 3 and image.dtype == torch.uint8 and 0 <= label < 10
    # Shuffled with a fixed seed: every class is in the held-out set, the same each time.
    assert set(split.val.targets) == set(range(10))
    again = builtin_splits(name, lambda x: x, lambda x: x)
    assert again.val.targets == split.val.targets


def test_load_rgb_decodes(tmp_path):
    Image.new("LA", (3, 3), (10, 255)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (10, 10, 10)
