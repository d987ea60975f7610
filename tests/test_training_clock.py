"""moco.run.training_clock: the training time of a run, across stops and resumes."""

import time

from moco.run.training_clock import TrainingClock


class _Module:
    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log(self, name: str, value: float, **kwargs) -> None:
        self.logged[name] = value


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
