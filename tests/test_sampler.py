"""moco.data.sampler: each epoch's order and each image's random draws depend on the seed and
the epoch alone, so a run can start an epoch part-way through and draw what it would have."""

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from moco.data.datasets import TensorImages
from moco.data.sampler import EpochSampler, SeededSamples


def _indices(sampler) -> list[int]:
    return [index for index, _ in sampler]


def test_each_epoch_has_its_own_permutation_drawn_from_the_seed_alone():
    sampler = EpochSampler(50, seed=3)
    first = _indices(sampler)
    assert sorted(first) == list(range(50))
    torch.manual_seed(123)  # the global generator plays no part
    assert _indices(EpochSampler(50, seed=3)) == first
    sampler.set_epoch(1)
    assert _indices(sampler) != first and sorted(_indices(sampler)) == list(range(50))
    assert _indices(EpochSampler(50, seed=4)) != first


def test_ranks_split_one_permutation_into_disjoint_equal_shares():
    shares = [_indices(EpochSampler(51, seed=0, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shares] == [17, 17, 17]
    assert len(set().union(*shares)) == 51
    whole = _indices(EpochSampler(51, seed=0))
    assert shares[1] == whole[1::3]


def test_starting_part_way_yields_the_rest_of_that_epoch_then_whole_epochs():
    sampler = EpochSampler(40, seed=1, rank=1, world=2)
    sampler.set_epoch(2)
    epoch_2 = list(sampler)
    sampler.start_at(2, 8)
    assert list(sampler) == epoch_2[8:]
    assert len(sampler) == 20  # the trainer still counts the whole epoch's batches
    assert list(sampler) == epoch_2  # the skip applied once
    sampler.start_at(2, 8)
    sampler.set_epoch(3)  # another epoch: the skip does not carry over
    assert len(list(sampler)) == 20


class _Noise(torch.utils.data.Dataset):
    """Each item is a draw from torch's generator: what a random transform does."""

    def __len__(self) -> int:
        return 30

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.rand(3)


def test_an_images_draws_depend_on_its_seed_not_on_the_worker_or_what_came_before():
    dataset = SeededSamples(_Noise())
    sampler = EpochSampler(30, seed=5)
    items = list(sampler)
    alone = {index: dataset[(index, seed)] for index, seed in items}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    reversed_order = {index: dataset[(index, seed)] for index, seed in reversed(items)}
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert all(torch.equal(alone[i], reversed_order[i]) for i in alone)
    # Two worker processes, a skipped first half: the second half is drawn the same.
    sampler.start_at(0, 16)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=2)
    second_half = torch.cat(list(loader))
    assert torch.equal(second_half, torch.stack([alone[i] for i, _ in items[16:]]))


def test_torchvision_transforms_draw_the_same_view_from_the_same_seed():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    transform = v2.Compose([v2.RandomResizedCrop(12, antialias=True), v2.RandomHorizontalFlip()])
    dataset = SeededSamples(TensorImages(images, torch.arange(4), transform))
    view, label = dataset[(2, 99)]
    torch.rand(5)  # other draws in between change nothing
    again, _ = dataset[(2, 99)]
    assert torch.equal(view, again) and int(label) == 2
    assert not torch.equal(view, dataset[(2, 100)][0])
