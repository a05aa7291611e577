"""Segmentation data: both folder layouts, bad pairs skipped and counted, split lists kept
inside their folder, joint augmentation, the generated mnist-seg, and mIoU against
torchmetrics."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenet.errors import MobileNetError
from mobilenet.segmentation.builtin import CLASSES, make_mnist_seg
from mobilenet.segmentation.data import (
    IGNORE,
    VOC_CLASSES,
    SegmentationFolder,
    collate,
    palette,
    train_transform,
)
from mobilenet.segmentation.metrics import ConfusionMatrix


def _mask(classes, size=(24, 32), seed=0):
    """An index mask ``[H, W]``: bands of each class, a 255 border."""
    h, w = size
    mask = np.repeat((np.arange(w) * classes // w)[None], h, axis=0).astype(np.uint8)
    mask[0] = IGNORE
    return np.roll(mask, seed, axis=1)


def _save_palette(array, path):
    picture = Image.fromarray(array)
    picture.putpalette([v for rgb in palette() for v in rgb])
    picture.save(path)


def pairs_folder(root, n=4, classes=3, size=(24, 32), names=True):
    """``images/`` + ``masks/``: each image's red channel is 80 x its mask's class."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = _mask(classes, size, seed=i)
        image = np.zeros((*size, 3), np.uint8)
        image[..., 0] = np.where(mask == IGNORE, 0, mask * 80)
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        _save_palette(mask, root / "masks" / f"{i}.png")
    if names:
        (root / "classes.txt").write_text("\n".join(f"c{i}" for i in range(classes)) + "\n")
    return root


def voc_folder(root, train=("a", "b"), val=("c",)):
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    for i, name in enumerate((*train, *val)):
        Image.new("RGB", (32, 24), (i * 40, 10, 10)).save(root / "JPEGImages" / f"{name}.jpg")
        _save_palette(_mask(21, seed=i), root / "SegmentationClass" / f"{name}.png")
    for split, names in (("train", train), ("val", val)):
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def test_voc_layout_reads_its_split_lists_and_palette_masks(tmp_path):
    root = voc_folder(tmp_path / "VOC2012")
    train, val = SegmentationFolder(root, "train"), SegmentationFolder(root, "val")
    assert (len(train), len(val), train.layout) == (2, 1, "voc")
    assert train.classes == list(VOC_CLASSES) and train.num_classes == 21
    image, mask = val[0]
    assert image.shape == (3, 24, 32) and mask.shape == (24, 32) and mask.dtype == torch.int64
    assert torch.equal(mask, torch.from_numpy(_mask(21, seed=2).astype(np.int64)))


def test_pairs_layout_classes_from_the_file_or_the_masks(tmp_path):
    named = SegmentationFolder(pairs_folder(tmp_path / "a", classes=3))
    assert named.layout == "pairs" and named.classes == ["c0", "c1", "c2"]
    unnamed = SegmentationFolder(pairs_folder(tmp_path / "b", classes=5, names=False))
    assert unnamed.classes == ["0", "1", "2", "3", "4"]  # the largest value + 1, not 255


def test_bad_pairs_are_skipped_with_one_warning_of_counts(tmp_path):
    root = pairs_folder(tmp_path / "data", n=8, classes=3)
    (root / "masks" / "0.png").unlink()  # mask missing
    _save_palette(_mask(3, (24, 30)), root / "masks" / "1.png")  # size differs
    (root / "images" / "3.png").write_bytes(b"not an image")
    (root / "masks" / "4.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (32, 24)).save(root / "masks" / "5.png")  # colour, not indices
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = SegmentationFolder(root)
    assert len(dataset) == 3
    assert len(caught) == 1
    line = str(caught[0].message)
    assert "5 image/mask pair(s) skipped" in line and "\n" not in line
    for reason in ("1 mask missing", "1 image and mask sizes differ", "1 image unreadable",
                   "2 mask unreadable"):  # fmt: skip
        assert reason in line, line


def test_mask_values_beyond_the_classes_are_refused(tmp_path):
    root = pairs_folder(tmp_path / "data", n=4, classes=3)
    (root / "classes.txt").write_text("a\nb\nc\n")
    _save_palette(_mask(5), root / "masks" / "2.png")  # values 3 and 4: beyond 3 classes
    with pytest.raises(MobileNetError, match=r"2\.png: holds the value 4, .* 3 classes"):
        SegmentationFolder(root)


def test_a_folder_without_usable_pairs_is_one_line(tmp_path):
    root = pairs_folder(tmp_path / "data", n=2)
    for mask in (root / "masks").iterdir():
        mask.unlink()
    with pytest.warns(UserWarning), pytest.raises(MobileNetError, match="no usable image/mask"):
        SegmentationFolder(root)
    with pytest.raises(MobileNetError, match="not a segmentation folder"):
        SegmentationFolder(tmp_path)


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/../../b", "C:\\x", "..\\x"])
def test_split_list_names_never_leave_the_folder(tmp_path, name):
    root = voc_folder(tmp_path / "VOC", train=("a",))
    (root / "ImageSets/Segmentation/train.txt").write_text(f"a\n{name}\n")
    with pytest.raises(MobileNetError, match=r"line 2: .* leads out of"):
        SegmentationFolder(root, "train")


def test_joint_augmentation_keeps_image_and_mask_aligned(tmp_path):
    root = pairs_folder(tmp_path / "data", n=1, classes=3)
    torch.manual_seed(0)
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    dataset = SegmentationFolder(root, transform=train_transform((40, 56), mean, std, (1.2, 2.5)))
    for _ in range(5):
        image, mask = dataset[0]
        assert image.shape == (3, 40, 56) and mask.shape == (40, 56)
        kept = mask != IGNORE
        # the red channel still says the class wherever the mask is not 255 (but where
        # the bilinear resize blends two bands)
        red = (image[0] * 255 / 80).round().long()
        assert kept.float().mean() > 0.5
        assert (red[kept] == mask[kept]).float().mean() > 0.85
    small = SegmentationFolder(root, transform=train_transform((64, 64), mean, std, (0.5, 0.5)))
    image, mask = small[0]  # 24x32 -> 32x43, smaller than the crop: padded
    padded = 64 * 64 - 32 * 43
    assert (mask == IGNORE).sum() >= padded and (image.abs().sum(0) == 0).sum() >= padded
    images, masks = collate([dataset[0], dataset[0]])
    assert images.shape == (2, 3, 40, 56) and masks.dtype == torch.int64


def test_mnist_seg_masks_are_digit_plus_one_where_opaque(tmp_path):
    root = make_mnist_seg(tmp_path / "mnist-seg", train_images=6, val_images=2)
    train = SegmentationFolder(root / "train")
    assert train.classes == CLASSES == ["background", *"0123456789"] and len(train) == 6
    assert len(SegmentationFolder(root / "val")) == 2
    for image, mask in (train[i] for i in range(6)):
        assert image.shape == (3, 128, 128) and 0 < (mask > 0).float().mean() < 0.6
        assert int(mask.max()) <= 10 and IGNORE not in mask
        # digit pixels are painted: far from the texture's mean colour under them
        digit = mask > 0
        assert (image[:, digit].float().mean(1) - image[:, ~digit].float().mean(1)).abs().max() > 40
    again = make_mnist_seg(tmp_path / "again", train_images=6, val_images=2)
    first, second = (np.asarray(Image.open(r / "train/masks/00004.png")) for r in (root, again))
    assert np.array_equal(first, second)  # deterministic


def test_palette_is_pascal_vocs():
    colours = palette()
    assert colours[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    assert colours[15] == (192, 128, 128) and colours[IGNORE] == (224, 224, 192)


def test_miou_matches_torchmetrics_jaccard_index():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    k = 6
    target = torch.randint(0, k - 1, (4, 37, 29), generator=g)  # class 5 never in the masks
    target[torch.rand(target.shape, generator=g) < 0.1] = IGNORE
    predicted = torch.randint(0, k - 2, (4, 37, 29), generator=g)  # ... nor predicted
    predicted[0, :3] = target[0, :3].clamp(max=k - 2)  # some agreement
    confusion = ConfusionMatrix(k)
    for p, t in zip(predicted, target, strict=True):  # accumulated image by image
        confusion.update(p, t)
    scores = confusion.scores()
    # "macro" leaves out classes absent from both predictions and masks, as we do
    jaccard = MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE)
    assert abs(scores["miou"] - jaccard(predicted, target).item()) < 1e-6
    per_class = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE)(predicted, target)
    assert scores["iou"]["5"] is None
    for c in range(k - 1):
        assert abs(scores["iou"][str(c)] - per_class[c].item()) < 1e-6
    accuracy = MulticlassAccuracy(k, average="micro", ignore_index=IGNORE)(predicted, target)
    assert abs(scores["pixel_accuracy"] - accuracy.item()) < 1e-6
    assert scores["pixels"] == int((target != IGNORE).sum())
