"""Batch mixing (torchvision's MixUp and CutMix) and the soft-target cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from mobilenet import MobileNetError
from mobilenet.classification.mixing import (
    BatchMixing,
    check_mixing,
    dominant_label,
    soft_target_cross_entropy,
)

CLASSES = 10


def batch(size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and distinct labels, so a mixed row's two shares can be read apart."""
    images = torch.randn(size, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(size) * 2


def shares(targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's share of its own label (lam); the rest belongs to the previous row's."""
    return targets[torch.arange(len(labels)), labels]


@pytest.mark.parametrize(
    ("mixup", "cutmix", "reference"),
    [(0.8, 0.0, v2.MixUp), (0.0, 1.0, v2.CutMix)],
)
def test_one_mixing_is_torchvisions_from_the_same_seed(mixup, cutmix, reference):
    images, labels = batch()
    mixing = BatchMixing(mixup, cutmix, 1.0, 0.5, CLASSES)
    expected_transform = reference(alpha=mixup or cutmix, num_classes=CLASSES)
    for seed in range(4):
        torch.manual_seed(seed)
        mixed, targets = mixing(images, labels)
        torch.manual_seed(seed)
        expected_images, expected_targets = expected_transform(images, labels)
        assert torch.equal(mixed, expected_images)
        assert torch.equal(targets, expected_targets)
        assert targets.dtype == torch.float32 and targets.shape == (len(labels), CLASSES)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


def test_both_mixings_switch_on_torchs_rng():
    images, labels = batch()
    mixing = BatchMixing(0.8, 1.0, 1.0, 0.5, CLASSES)
    chosen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        mixed, targets = mixing(images, labels)
        torch.manual_seed(seed)
        use_cutmix = float(torch.rand(())) < 0.5
        reference = (
            v2.CutMix(alpha=1.0, num_classes=CLASSES)
            if use_cutmix
            else v2.MixUp(alpha=0.8, num_classes=CLASSES)
        )
        expected_images, expected_targets = reference(images, labels)
        assert torch.equal(mixed, expected_images) and torch.equal(targets, expected_targets)
        torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))
        chosen.add(use_cutmix)
    assert chosen == {True, False}


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 1.0), (0.0, 0.0)])
def test_unmixed_batches_keep_their_images_and_get_one_hot_targets(mixup, cutmix):
    images, labels = batch()
    mixing = BatchMixing(mixup, cutmix, 0.0 if mixup else 1.0, 0.5, CLASSES)
    assert not mixing.enabled
    state = torch.get_rng_state()
    out, targets = mixing(images, labels)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    assert torch.equal(out, images)
    assert torch.equal(targets, F.one_hot(labels, CLASSES).float())


@pytest.mark.parametrize("mix_prob", [0.25, 0.75])
def test_mix_prob_mixes_that_share_of_batches(mix_prob):
    images, labels = batch()
    mixing = BatchMixing(0.8, 0.0, mix_prob, 0.5, CLASSES)
    torch.manual_seed(0)
    mixed = [not torch.equal(mixing(images, labels)[0], images) for _ in range(400)]
    assert abs(sum(mixed) / len(mixed) - mix_prob) < 0.07


def test_switch_prob_0_is_mixup_only_a_blend_with_the_rolled_batch():
    images, labels = batch()
    mixing = BatchMixing(1.0, 1.0, 1.0, 0.0, CLASSES)
    torch.manual_seed(0)
    for _ in range(10):
        mixed, targets = mixing(images, labels)
        lam = shares(targets, labels).view(-1, 1, 1, 1)
        assert torch.allclose(lam, lam[0])  # one lam for the batch
        blend = lam * images + (1 - lam) * images.roll(1, 0)
        torch.testing.assert_close(mixed, blend)
        # A blend, not a pasted box: (almost) no pixel is either image's own.
        assert (mixed == images).float().mean() < 0.01 or lam[0] == 1


def test_switch_prob_1_is_cutmix_only_a_box_of_the_rolled_batch():
    images, labels = batch()
    rolled = images.roll(1, 0)
    mixing = BatchMixing(1.0, 1.0, 1.0, 1.0, CLASSES)
    torch.manual_seed(0)
    for _ in range(10):
        mixed, targets = mixing(images, labels)
        pasted = (mixed == rolled) & (mixed != images)
        assert torch.equal(mixed, torch.where(pasted, rolled, images))
        box = pasted[0, 0]
        assert (pasted == box).all()  # the same box in every image and channel
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if len(rows):  # a box may be empty, then the batch is unchanged
            rectangle = torch.zeros_like(box)
            rectangle[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
            assert torch.equal(box, rectangle)
        lam = shares(targets, labels)
        torch.testing.assert_close(lam, torch.full_like(lam, 1 - box.float().mean().item()))


def test_same_seed_same_batch():
    images, labels = batch()
    mixing = BatchMixing(0.8, 1.0, 0.7, 0.5, CLASSES)
    torch.manual_seed(3)
    first = [mixing(images, labels) for _ in range(5)]
    torch.manual_seed(3)
    again = [mixing(images, labels) for _ in range(5)]
    for (a_images, a_targets), (b_images, b_targets) in zip(first, again, strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_targets, b_targets)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_cross_entropy_on_one_hot_is_cross_entropy(smoothing):
    logits = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9, 3, 1, 5])
    ours = soft_target_cross_entropy(logits, F.one_hot(labels, CLASSES).float(), smoothing)
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, label_smoothing=smoothing))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_soft_cross_entropy_on_mixed_targets_is_the_mix_of_the_two(smoothing):
    logits = torch.randn(6, CLASSES, generator=torch.Generator().manual_seed(1))
    a, b, lam = torch.tensor([0, 3, 9, 3, 1, 5]), torch.tensor([2, 3, 4, 8, 1, 0]), 0.3
    mixed = lam * F.one_hot(a, CLASSES).float() + (1 - lam) * F.one_hot(b, CLASSES).float()
    expected = lam * F.cross_entropy(logits, a, label_smoothing=smoothing) + (
        1 - lam
    ) * F.cross_entropy(logits, b, label_smoothing=smoothing)
    torch.testing.assert_close(soft_target_cross_entropy(logits, mixed, smoothing), expected)


def test_dominant_label_is_the_larger_share():
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6], [0.0, 1.0, 0.0]])
    assert dominant_label(targets).tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ((-0.1, 0.0, 1.0, 0.5), "--mixup"),
        ((float("inf"), 0.0, 1.0, 0.5), "--mixup"),
        ((0.0, float("nan"), 1.0, 0.5), "--cutmix"),
        ((0.2, 1.0, 1.5, 0.5), "--mix-prob"),
        ((0.2, 1.0, float("nan"), 0.5), "--mix-prob"),
        ((0.2, 1.0, 1.0, -0.5), "--switch-prob"),
    ],
)
def test_bad_mixing_settings_are_refused_in_one_line(values, flag):
    with pytest.raises(MobileNetError, match=flag) as caught:
        check_mixing(*values)
    assert "\n" not in str(caught.value)
    with pytest.raises(MobileNetError, match=flag):
        BatchMixing(*values, CLASSES)
