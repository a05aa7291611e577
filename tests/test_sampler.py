"""The repeated-augmentation sampler (DeiT's RASampler)."""

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from mobilenet import MobileNetError
from mobilenet.train.sampler import RepeatedAugmentationSampler

SHAPES = [(12, 3, 3), (10, 4, 3), (7, 2, 2), (100, 8, 4), (5, 1, 1), (33, 3, 1)]


def samplers(size: int, replicas: int, repeats: int, seed: int = 0, epoch: int = 0):
    out = [
        RepeatedAugmentationSampler(size, replicas, rank, repeats, seed) for rank in range(replicas)
    ]
    for sampler in out:
        sampler.set_epoch(epoch)
    return out


class Sized:
    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@pytest.mark.parametrize(("size", "replicas", "repeats"), SHAPES)
def test_every_replica_yields_len_samples_a_distributed_samplers_length(size, replicas, repeats):
    for rank, sampler in enumerate(samplers(size, replicas, repeats)):
        reference = DistributedSampler(Sized(size), replicas, rank, drop_last=True)
        assert len(sampler) == len(reference) == size // replicas
        assert len(list(sampler)) == len(sampler)
        assert all(0 <= i < size for i in sampler)


@pytest.mark.parametrize(("size", "replicas", "repeats"), [(12, 3, 3), (10, 4, 2), (9, 2, 4)])
def test_all_replicas_together_hold_each_index_repeats_times(size, replicas, repeats):
    assert size * repeats % replicas == 0
    shares = [s.replica_indices() for s in samplers(size, replicas, repeats, epoch=5)]
    assert len({len(share) for share in shares}) == 1
    assert Counter(i for share in shares for i in share) == dict.fromkeys(range(size), repeats)


def test_the_copies_of_an_image_go_to_different_replicas():
    shares = [s.replica_indices() for s in samplers(20, 3, 3, epoch=1)]
    for share in shares:
        assert sorted(share) == list(range(20))  # one copy of every image per replica
    yielded = [list(s) for s in samplers(20, 3, 3, epoch=1)]
    for share in yielded:
        assert len(set(share)) == len(share) == 20 // 3


def test_one_replica_sees_each_image_repeats_times_in_a_row():
    (sampler,) = samplers(6, 1, 3, epoch=2)
    order = list(sampler)
    assert len(order) == 6
    assert order[0::3] == order[1::3] == order[2::3]


def test_the_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        return [list(s) for s in samplers(50, 2, 2, seed, epoch)]

    assert order(0, 3) == order(0, 3)  # a resumed run draws the same order
    assert order(0, 3) != order(0, 4)
    assert order(0, 3) != order(1, 3)
    sampler = RepeatedAugmentationSampler(50, 2, 0, 2, seed=0)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(0)
    list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first


def test_without_shuffle_the_order_is_the_dataset_order():
    sampler = RepeatedAugmentationSampler(4, 1, 0, 2, shuffle=False)
    assert sampler.replica_indices() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(sampler) == [0, 0, 1, 1]


@pytest.mark.parametrize(("size", "replicas"), [(33, 3), (10, 4), (7, 1)])
def test_one_repeat_is_a_distributed_sampler_with_drop_last(size, replicas):
    for rank, sampler in enumerate(samplers(size, replicas, 1, seed=7, epoch=2)):
        reference = DistributedSampler(Sized(size), replicas, rank, seed=7, drop_last=True)
        reference.set_epoch(2)
        assert list(sampler) == list(reference)


@pytest.mark.parametrize(
    ("args", "words"),
    [((10, 2, 0, 0), "--aug-repeats 0"), ((10, 2, 2, 3), "rank 2"), ((10, 0, 0, 3), "rank 0")],
)
def test_bad_arguments_are_refused_in_one_line(args, words):
    with pytest.raises(MobileNetError, match=words) as caught:
        RepeatedAugmentationSampler(*args)
    assert "\n" not in str(caught.value)
