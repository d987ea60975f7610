"""How loader workers start (moco/data/workers.py): forked outside a process group, spawned
inside one (a fork there can inherit a lock held by one of the group's threads and hang), in
both cases deaf to the stop signals, which the training process handles, and kept from one pass
to the next by the loaders read every epoch."""

import os
import signal

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moco.data import PretrainDataModule
from moco.data.workers import STOP_SIGNALS, leave_stop_signals_to_training, loader_workers
from moco.eval.features import extract_features, feature_loader


def _deaf_to_stop_signals() -> bool:
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return all(signal.getsignal(s) == signal.SIG_IGN and s not in blocked for s in STOP_SIGNALS)


class SignalProbe(Dataset):
    """Images of zeros whose label says, from inside the worker, whether the stop signals were
    blocked when the worker unpickled it (before any worker code of ours ran; spawn only) and
    whether they are ignored and unblocked now: 1 for yes, 0 for no, as bits 1 and 0."""

    def __init__(self):
        self.blocked_at_start = None  # a non-empty state: pickle calls __setstate__ only then

    def __setstate__(self, state):
        self.__dict__.update(state)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.blocked_at_start = all(s in blocked for s in STOP_SIGNALS)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.zeros(1), 2 * bool(self.blocked_at_start) + _deaf_to_stop_signals()


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class WorkerPid(Dataset):
    """Labels that name the process that made them."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return torch.zeros(1), os.getpid()


def _pids(loader) -> set[int]:
    return {pid for _, labels in loader for pid in labels.tolist()}


def test_without_workers_nothing_changes():
    assert loader_workers(0) == {"num_workers": 0}
    assert loader_workers(0, keep=True) == {"num_workers": 0}  # no workers to keep


def test_a_kept_loader_reuses_its_workers_and_another_starts_new_ones():
    kept = feature_loader(WorkerPid(), batch_size=2, num_workers=1, keep_workers=True)
    first, second = _pids(kept), _pids(kept)
    assert first == second and os.getpid() not in first
    fresh = feature_loader(WorkerPid(), batch_size=2, num_workers=1)
    assert _pids(fresh) != _pids(fresh)


def test_outside_a_process_group_workers_fork_and_ignore_the_stop_signals():
    options = loader_workers(1)
    assert options["multiprocessing_context"] is None  # the platform's default: fork on Linux
    labels = torch.cat([labels for _, labels in DataLoader(SignalProbe(), batch_size=2, **options)])
    assert labels.tolist() == [1] * 4
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the caller's own are untouched


def test_in_a_process_group_workers_are_spawned_with_the_stop_signals_blocked_until_ignored(
    process_group,
):
    options = loader_workers(1)
    assert options["multiprocessing_context"].get_start_method() == "spawn"
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    labels = torch.cat([labels for _, labels in DataLoader(SignalProbe(), batch_size=2, **options)])
    assert labels.tolist() == [3] * 4  # blocked from the start, then ignored and let through
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask_before  # the parent's mask is back


def test_the_training_loader_and_the_feature_extraction_take_their_workers_from_the_rule(
    process_group, tiny_cfg
):
    cfg = tiny_cfg("data.num_workers=1")
    dm = PretrainDataModule(cfg.data, cfg.augment)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert loader.worker_init_fn is leave_stop_signals_to_training
    assert loader.persistent_workers  # read every epoch; its samples carry their own seeds
    _, labels = extract_features(nn.Flatten(), SignalProbe(), batch_size=2, num_workers=1)
    assert labels.tolist() == [3] * 4
