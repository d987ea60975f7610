"""moco.run.time_budget: a run that plans its epochs to fill a time budget."""

import itertools
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_RUN
from omegaconf import OmegaConf

from moco.errors import ConfigError
from moco.momentum import cosine_momentum
from moco.optim.scheduled import scheduled_optimizer
from moco.optim.schedules import lr_factor
from moco.run.check import check_pretrain
from moco.run.time_budget import TimeBudget, expected_epoch_s, growth_window, planned_epochs

REPO = Path(__file__).resolve().parents[1]


def test_planned_epochs_are_those_done_and_the_expected_epochs_that_fit():
    assert planned_epochs(done=1, spent_s=100, budget_s=1000, most=40, epoch_s=100) == 10
    assert planned_epochs(done=4, spent_s=400, budget_s=1050, most=40, epoch_s=100) == 10  # 6.5
    assert planned_epochs(done=2, spent_s=500, budget_s=1000, most=40, epoch_s=100) == 7
    assert planned_epochs(done=1, spent_s=10, budget_s=1000, most=5, epoch_s=10) == 5  # the most
    assert planned_epochs(done=5, spent_s=600, budget_s=500, most=40, epoch_s=120) == 5  # over
    assert planned_epochs(done=0, spent_s=0, budget_s=500, most=40, epoch_s=0) == 40  # nothing yet


class _Strategy:
    """Rank 0's plan arrives by broadcast; ``rank0_plan`` plays rank 0 on another rank."""

    def __init__(self, rank0_plan=None) -> None:
        self.rank0_plan = rank0_plan

    def broadcast(self, obj, src=0):
        assert src == 0
        return obj if self.rank0_plan is None else self.rank0_plan


def _trainer(max_epochs=40, epoch=0, strategy=None):
    return SimpleNamespace(
        current_epoch=epoch,
        fit_loop=SimpleNamespace(max_epochs=max_epochs),
        strategy=strategy or _Strategy(),
        is_global_zero=True,
    )


class _Module:
    def __init__(self) -> None:
        self.logged = {}

    def log(self, name, value, **kwargs) -> None:
        self.logged[name] = value


def test_the_plan_sets_max_epochs_and_a_resumed_run_keeps_it():
    clock = SimpleNamespace(seconds=120.0)  # the first epoch took 2 minutes
    budget, trainer, module = TimeBudget(60, 40, clock), _trainer(), _Module()
    budget.on_train_epoch_end(trainer, module)
    assert trainer.fit_loop.max_epochs == 30  # 1 + 3480 s / 120 s
    assert module.logged["time/planned_epochs"] == 30

    resumed, trainer = TimeBudget(60, 40, clock), _trainer()  # the config's 40 again
    resumed.load_state_dict(budget.state_dict())
    resumed.on_fit_start(trainer, module)
    assert trainer.fit_loop.max_epochs == 30
    assert resumed.epoch_lengths == [120.0]  # the epochs' lengths travel with the plan


def test_a_plan_grows_and_shrinks_with_the_machine():
    clock = SimpleNamespace(seconds=200.0)  # a slow first epoch: 18 epochs fit
    budget, trainer = TimeBudget(60, 40, clock), _trainer()
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 18
    clock.seconds, trainer.current_epoch = 300.0, 1  # then a fast one: 24 fit
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 24
    clock.seconds, trainer.current_epoch = 1500.0, 11  # epochs of 120 s: 29 fit
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 25  # half of 24 done: one epoch more at a time
    clock.seconds, trainer.current_epoch = 2600.0, 12  # a slow one, taken as a passing one
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 21  # the 1000 s left hold 8 epochs of 120 s
    clock.seconds, trainer.current_epoch = 3700.0, 13  # slow again: the machine is slower now
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 14  # over the budget: stop now


def test_under_a_step_schedule_a_plan_grows_only_before_the_first_drop():
    clock = SimpleNamespace(seconds=200.0)
    budget, trainer = TimeBudget(60, 40, clock, growth_window=0.6), _trainer()
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 18
    clock.seconds, trainer.current_epoch = 300.0, 1  # a fast second epoch, before the drop
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 24
    clock.seconds, trainer.current_epoch = 1500.0, 14  # 15 of 24 done, past 0.6: 37 would fit
    budget.on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 24


def _plans(epoch_s, stop_after=None):
    """The plan after every epoch of a run whose epochs take ``epoch_s(epoch)`` seconds; with
    ``stop_after``, the run is stopped after that many epochs and resumed from its state."""
    clock, trainer = SimpleNamespace(seconds=0.0), _trainer()
    budget, plans = TimeBudget(60, 40, clock), []
    while trainer.current_epoch < trainer.fit_loop.max_epochs:
        clock.seconds += epoch_s(trainer.current_epoch)
        budget.on_train_epoch_end(trainer, _Module())
        plans.append(trainer.fit_loop.max_epochs)
        trainer.current_epoch += 1
        if trainer.current_epoch == stop_after:
            resumed = TimeBudget(60, 40, clock)
            resumed.load_state_dict(budget.state_dict())
            resumed.on_fit_start(trainer, _Module())
            budget = resumed
    return plans, clock.seconds


def test_late_in_a_plan_it_grows_by_one_epoch_at_a_time():
    # Epochs of 120 s, but the 11th and 12th take 400 s: the plan falls from 27 to 16, and once
    # the machine is fast again 25 epochs would fit. Taking them at once would lift the cosine's
    # lr at epoch 14 from 4% to 41% of its peak; one epoch at a time lifts it a few per cent.
    plans, spent = _plans(lambda epoch: 400.0 if epoch in (10, 11) else 120.0)
    assert plans == [30] * 10 + [27, 16, 16, *range(17, 26), 25, 25, 25]
    assert spent <= 3600.0
    steps = 100
    for done, (before, after) in enumerate(itertools.pairwise(plans), start=2):
        if after > before:
            lift = lr_factor(done * steps, after * steps, "cosine", 0) - lr_factor(
                done * steps, before * steps, "cosine", 0
            )
            assert lift <= math.pi / 2 / (before + 1)
            # MoCo v3's cosine momentum falls back towards its base by no more of its range
            fall = cosine_momentum(0.99, done * steps, before * steps) - cosine_momentum(
                0.99, done * steps, after * steps
            )
            assert 0 < fall <= (1 - 0.99) * math.pi / 2 / (before + 1)


def test_a_resumed_run_plans_as_one_never_stopped():
    def epoch_s(epoch):
        return 443.0 if epoch == 0 else 250.0 + 40.0 * (epoch % 3)

    straight, _ = _plans(epoch_s)
    for stop_after in (1, 2, 5):
        assert _plans(epoch_s, stop_after=stop_after)[0] == straight


def test_a_checkpoint_without_epoch_lengths_shares_its_time_among_its_epochs():
    clock = SimpleNamespace(seconds=360.0)  # three epochs in 6 minutes
    budget = TimeBudget(60, 40, clock)
    budget.load_state_dict({"planned": 30, "budget_s": 3600.0, "most": 40})
    trainer = _trainer(epoch=2)
    budget.on_fit_start(trainer, _Module())
    budget.on_train_epoch_end(trainer, _Module())
    assert budget.epoch_lengths == [120.0, 120.0, 120.0]
    assert trainer.fit_loop.max_epochs == 30  # 3 + 3240 s / 120 s


def test_an_epoch_slowed_by_another_job_does_not_shorten_the_plan():
    # The first epoch shares the CPU (443 s), the others take 250 s: 13 fit in the hour. From
    # the third epoch on the plan says so and keeps it, so the cosine's end stays put. A plan
    # from the mean epoch would say 11, 12 and only reach 13 after the eighth epoch.
    plans, spent = _plans(lambda epoch: 443.0 if epoch == 0 else 250.0)
    assert plans[2:] == [13] * 11
    assert spent <= 3600.0


def test_the_expected_epoch_is_the_median_of_the_last_three():
    assert expected_epoch_s([400.0]) == 400.0
    assert expected_epoch_s([400.0, 100.0]) == 250.0
    assert expected_epoch_s([900.0, 100.0, 110.0, 500.0]) == 110.0  # the first is forgotten


@pytest.mark.parametrize(
    "scheduler,window",
    [
        ({"name": "cosine"}, 1.0),
        ({"name": "constant"}, 1.0),
        ({"name": "step", "milestones": [0.6, 0.8]}, 0.6),  # MoCo v1's
        ({"name": "step", "milestones": [0.3, 0.8]}, 0.3),
    ],
)
def test_the_growth_window_ends_before_the_first_drop(scheduler, window):
    assert growth_window(OmegaConf.create(scheduler)) == window


def test_a_plan_that_grows_in_its_window_undoes_no_lr_drop():
    scheduler = {"name": "step", "milestones": [0.3, 0.8]}
    window, steps_per_epoch = growth_window(OmegaConf.create(scheduler)), 10
    for planned in range(2, 30):
        for done in range(1, planned):
            if done >= window * planned:
                continue  # outside the window the plan cannot grow
            step = done * steps_per_epoch
            before = lr_factor(step, planned * steps_per_epoch, "step", 0, scheduler["milestones"])
            after = lr_factor(step, 40 * steps_per_epoch, "step", 0, scheduler["milestones"])
            assert before == after == 1.0  # no drop had happened, none is undone


def test_a_run_resumed_with_another_budget_or_bound_plans_afresh():
    clock = SimpleNamespace(seconds=120.0)
    budget = TimeBudget(60, 40, clock)
    budget.on_train_epoch_end(_trainer(), _Module())
    for minutes, most in ((90, 40), (60, 50)):
        resumed, trainer = TimeBudget(minutes, most, clock), _trainer(max_epochs=most)
        resumed.load_state_dict(budget.state_dict())
        resumed.on_fit_start(trainer, _Module())
        assert trainer.fit_loop.max_epochs == most  # until its next epoch's plan
        resumed.on_train_epoch_end(trainer, _Module())
        assert trainer.fit_loop.max_epochs == min(most, 60 * minutes // 120)


def test_every_rank_takes_rank_zeros_plan():
    trainer = _trainer(strategy=_Strategy(rank0_plan=29))
    TimeBudget(60, 40, SimpleNamespace(seconds=110.0)).on_train_epoch_end(trainer, _Module())
    assert trainer.fit_loop.max_epochs == 29  # its own clock would have said 32


def test_the_lr_schedule_follows_a_run_whose_length_changes():
    length = {"steps": 100}
    weight = torch.nn.Parameter(torch.zeros(1))
    sgd = {"_target_": "torch.optim.SGD", "lr": 1.0}
    opt, schedule = scheduled_optimizer(
        [weight], sgd, {"name": "cosine", "warmup_epochs": 1}, lambda: length["steps"], 10
    )
    for _ in range(20):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(20, 100, "cosine", 10))
    length["steps"] = 30  # the plan shrinks: the cosine now ends at step 30
    for _ in range(9):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(29, 30, "cosine", 10))
    assert opt.param_groups[0]["lr"] < 0.01


def test_a_warm_up_longer_than_the_run_ends_with_it():
    weight = torch.nn.Parameter(torch.zeros(1))
    sgd = {"_target_": "torch.optim.SGD", "lr": 1.0}
    opt, schedule = scheduled_optimizer(
        [weight], sgd, {"name": "cosine", "warmup_epochs": 10}, lambda: 20, 10
    )
    for _ in range(19):
        opt.step()
        schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # the last step at the full lr


@pytest.mark.parametrize("minutes", [0, -5])
def test_a_budget_must_be_positive(tiny_cfg, minutes):
    with pytest.raises(ConfigError, match=r"time_budget_minutes=[-0-9.]+ must be > 0 minutes"):
        check_pretrain(tiny_cfg(f"time_budget_minutes={minutes}"))


def test_a_budget_needs_an_epoch_bound(tiny_cfg):
    cfg = tiny_cfg("time_budget_minutes=60", "trainer.max_epochs=-1", "trainer.max_steps=50")
    with pytest.raises(ConfigError, match="time_budget_minutes=null for a run of"):
        check_pretrain(cfg)


def _pretrain(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/pretrain.py", f"hydra.run.dir={run_dir}", *TINY_RUN]
    result = subprocess.run(
        [*command, *extra], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_run_stops_when_its_budget_is_spent_and_resumes_to_the_same_end(tmp_path):
    # A budget shorter than one epoch: the plan after the first is to stop there.
    args = ("trainer.max_epochs=3", "time_budget_minutes=0.0001")
    first = _pretrain(tmp_path, *args)
    assert "time budget: 1 epoch planned" in first.stdout
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch*.ckpt")) == [
        "epoch000.ckpt"
    ]
    # Started again in its directory, it resumes with its plan, not the config's 3 epochs.
    again = _pretrain(tmp_path, *args)
    assert "Resuming from" in again.stdout
    assert not (tmp_path / "checkpoints" / "epoch001.ckpt").exists()
