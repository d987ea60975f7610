"""moco.run.training_clock: the training time of a run, across stops and resumes."""

import time
from types import SimpleNamespace

import pytest
import torch

from moco.run.training_clock import TrainingClock


class _Module:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_dict(self, values: dict[str, float], **kwargs) -> None:
        self.logged.update(values)


def test_counts_epochs_and_continues_from_a_checkpoints_count():
    module = _Module()
    clock = TrainingClock()
    clock.on_train_epoch_start(None, module)
    time.sleep(0.05)
    clock.on_train_epoch_end(None, module)
    first = module.logged["time/train_s"]
    assert first >= 0.05

    # A resumed run: a new clock, restored from what the checkpoint held.
    resumed = TrainingClock()
    resumed.load_state_dict(clock.state_dict())
    resumed.on_train_epoch_start(None, module)
    time.sleep(0.05)
    resumed.on_train_epoch_end(None, module)
    assert module.logged["time/train_s"] >= first + 0.05
    assert resumed.state_dict()["seconds"] == module.logged["time/train_s"]


def test_time_between_epochs_is_not_counted():
    module = _Module()
    clock = TrainingClock()
    clock.on_train_epoch_start(None, module)
    clock.on_train_epoch_end(None, module)
    time.sleep(0.1)  # e.g. a checkpoint being written
    clock.on_train_epoch_start(None, module)
    clock.on_train_epoch_end(None, module)
    assert module.logged["time/train_s"] < 0.05


def test_a_checkpoint_within_an_epoch_carries_the_epochs_time_and_images():
    """Resumed part-way through an epoch (Lightning calls no on_train_epoch_start then), the
    epoch's time and its images per second cover both parts."""
    module, trainer = _Module(), SimpleNamespace(world_size=2)
    batch = ((None, None), torch.zeros(8))  # 8 images per process
    clock = TrainingClock()
    clock.on_train_start(trainer, module)
    clock.on_train_epoch_start(trainer, module)
    time.sleep(0.05)
    clock.on_train_batch_end(trainer, module, None, batch, 0)
    saved = clock.state_dict()
    assert saved["images"] == 16 and saved["seconds"] >= 0.05

    resumed = TrainingClock()
    resumed.load_state_dict(saved)
    resumed.on_train_start(trainer, module)
    time.sleep(0.05)
    resumed.on_train_batch_end(trainer, module, None, batch, 1)
    resumed.on_train_epoch_end(trainer, module)
    logged = module.logged
    assert logged["time/epoch_s"] == pytest.approx(logged["time/train_s"])
    assert logged["time/epoch_s"] >= 0.1
    steps_s = resumed.state_dict()["steps_s"]
    assert logged["throughput/images_per_s"] == pytest.approx(32 / steps_s)


def test_saving_a_checkpoint_leaves_the_clock_as_it_was():
    clock = TrainingClock()
    clock.on_train_epoch_start(None, _Module())
    time.sleep(0.02)
    before = (clock.seconds, clock._epoch_s, clock._since)
    saved = clock.state_dict()
    assert (clock.seconds, clock._epoch_s, clock._since) == before
    assert saved["seconds"] == saved["epoch_s"] >= 0.02
    assert clock.state_dict()["seconds"] >= saved["seconds"]  # the epoch goes on counting
