"""The order of each epoch and the random draws of each sample, as functions of the run's seed
and the epoch alone, so that a run stopped anywhere in an epoch continues with the next batch
exactly as if it had never stopped.

Neither depends on generator states that live outside a checkpoint: not the main process's
generator at the moment the loader starts (which moves on as the epoch runs), nor the
generators of the loader's worker processes (which have drawn for batches a resumed run skips).
"""

import torch
from torch.utils.data import Dataset, Sampler


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Every (seed, epoch) of a run shorter than a million epochs gets a generator seed of its
    # own. Plain arithmetic, not hash(), which need not agree across Python versions: a run
    # resumed on another machine must draw the same orders.
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)


class EpochSampler(Sampler):
    """A fresh permutation of the data set per epoch, split between the ranks, that yields
    ``(index, sample_seed)`` pairs and can start an epoch part-way through.

    Every rank draws the same permutation and takes every ``world``-th index from its own
    offset (the tail that does not divide by ``world`` is left out, as DDP's sampler does with
    ``drop_last``), so the ranks never see the same image in one epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0
        self._skip = 0  # samples of this rank's share to leave out, for one epoch only

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch."""
        if epoch != self.epoch:
            self._skip = 0  # a start part-way through applies to its own epoch only
        self.epoch = epoch

    def start_at(self, epoch: int, samples_done: int) -> None:
        """The next iteration is ``epoch`` without its first ``samples_done`` samples."""
        self.epoch, self._skip = epoch, samples_done

    def __len__(self) -> int:
        # A whole epoch's share, also when starting part-way: the trainer counts an epoch's
        # batches from the length and goes on from the batches it has already done.
        return self.size // self.world

    def __iter__(self):
        generator = _epoch_generator(self.seed, self.epoch)
        order = torch.randperm(self.size, generator=generator)
        seeds = torch.randint(2**62, (self.size,), generator=generator)  # one per image
        mine = order[: len(self) * self.world][self.rank :: self.world][self._skip :]
        self._skip = 0
        for index in mine.tolist():
            yield index, int(seeds[index])


class SeededSamples(Dataset):
    """``dataset[index]`` drawn with torch's generator seeded by the sampler's ``sample_seed``.

    The random transforms of an image then depend on its seed alone, not on which worker
    process made it or what that worker made before. The transforms (torchvision's
    ``transforms.v2``) draw from torch's CPU generator only. Its state is put back afterwards,
    which matters when the loader runs in the training process itself.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        # The generator itself, not torch.manual_seed: that also seeds every accelerator's
        # generators, which costs far more than the transforms of a small image.
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)
