"""A run that fills a time budget: as many epochs as fit, with the schedules ending at the last.

A fixed epoch count takes twice as long on one CPU as on another. With ``time_budget_minutes``
the run plans its length after every epoch from the training time spent so far (the
``TrainingClock``'s count): the epochs done plus as many epochs as the time left holds, never
more than ``trainer.max_epochs``. An epoch to come is expected to last the median of the last
three: one epoch slowed by another job neither shortens the plan nor, once the machine is fast
again, holds it short, as a mean over all epochs would; two slow epochs in a row do shorten it.
The lr and momentum schedules read the run's length every step (``moco.optim.scheduled``), so
the cosine ends at the last planned epoch.

A plan may grow freely in its first half, while the lr is still at least half its peak. In its
second half it grows by at most one epoch at each epoch's end: a cosine made one epoch longer
than a plan of ``P`` epochs lifts the lr (and lowers a cosine momentum) by at most
pi/2 / (P + 1) of its range (at epoch 13 of 14, from 1.3% to 4.3% of the peak lr), a small price
for an epoch of the budget that would otherwise go unused, where growing by several would throw
a run near its end back to a high lr. Under a step schedule it may grow only before the
first milestone, so that a later end never undoes a drop.

The plan is made on rank 0 and broadcast, so all processes stop after the same epoch. It travels
in the checkpoints with the budget it was made for: a run resumed with the same budget and bound
keeps it, one resumed with another plans afresh after its next epoch.
"""

import math
import statistics

import pytorch_lightning as pl

from moco.run.console import print_line
from moco.run.training_clock import TrainingClock

RECENT_EPOCHS = 3  # the epochs whose median length predicts the next ones
FREE_GROWTH_SHARE = 0.5  # the share of a plan in which it may grow by more than one epoch


def planned_epochs(done: int, spent_s: float, budget_s: float, most: int, epoch_s: float) -> int:
    """The epochs a run should have when ``done`` of them took ``spent_s`` seconds of a budget of
    ``budget_s``: those done and as many more epochs of ``epoch_s`` seconds as fit, at most
    ``most``."""
    if done < 1 or spent_s <= 0 or epoch_s <= 0:
        return most
    more = math.floor(max(budget_s - spent_s, 0.0) / epoch_s)
    return max(done, min(done + more, most))


def expected_epoch_s(epoch_lengths: list[float]) -> float:
    """The length of an epoch to come: the median of the last ``RECENT_EPOCHS`` epochs."""
    return statistics.median(epoch_lengths[-RECENT_EPOCHS:])


def growth_window(scheduler_cfg) -> float:
    """The share of a plan's epochs before which it may still grow: all of them, or the first
    milestone of a step schedule (a later end must not undo a drop)."""
    milestones = []
    if scheduler_cfg.name == "step":
        milestones = list(scheduler_cfg.get("milestones") or [])
    return min([1.0, *milestones])


def allowed_plan(plan: int, planned: int | None, done: int, window: float) -> int:
    """``plan`` as far as the run may take it after ``done`` epochs of the ``planned``: shorter
    always; longer without bound in the plan's first half, by one epoch up to ``window`` (its
    ``growth_window``), not at all after."""
    if planned is None or plan <= planned:
        return plan
    if done >= window * planned:
        return planned
    if done >= FREE_GROWTH_SHARE * planned:
        return planned + 1
    return plan


class TimeBudget(pl.Callback):
    """Sets the Trainer's ``max_epochs`` at the end of every epoch (see the module's docstring),
    to at most ``most_epochs`` (the config's ``trainer.max_epochs``).

    ``clock`` is the run's ``TrainingClock``, which must come before this callback in the
    Trainer's list so that it has counted the epoch.
    """

    def __init__(
        self, minutes: float, most_epochs: int, clock: TrainingClock, growth_window: float = 1.0
    ) -> None:
        self.budget_s, self.most_epochs, self.clock = 60.0 * minutes, most_epochs, clock
        self.growth_window = growth_window
        self.planned: int | None = None  # None until the first epoch has ended
        self.epoch_lengths: list[float] = []  # the seconds of every finished epoch, in order

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's state was loaded: a resumed run goes on with its plan.
        if self.planned is not None:
            trainer.fit_loop.max_epochs = self.planned

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        self._count_epochs(done)
        plan = planned_epochs(
            done,
            self.clock.seconds,
            self.budget_s,
            self.most_epochs,
            expected_epoch_s(self.epoch_lengths),
        )
        plan = allowed_plan(plan, self.planned, done, self.growth_window)
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan != self.planned and trainer.is_global_zero:
            spent, budget = self.clock.seconds / 60, self.budget_s / 60
            print_line(
                f"time budget: {plan} epoch{'s' if plan != 1 else ''} planned "
                f"({spent:.1f} of {budget:g} min spent)"
            )
        self.planned = plan
        trainer.fit_loop.max_epochs = plan
        pl_module.log("time/planned_epochs", float(plan), rank_zero_only=True)

    def _count_epochs(self, done: int) -> None:
        """Adds the epochs finished since the last count, sharing their seconds equally (more
        than one only in a run resumed from a checkpoint that did not count them)."""
        new = done - len(self.epoch_lengths)
        if new > 0:
            seconds = max(self.clock.seconds - sum(self.epoch_lengths), 0.0)
            self.epoch_lengths += [seconds / new] * new

    def state_dict(self) -> dict:
        return {
            "planned": self.planned,
            "budget_s": self.budget_s,
            "most": self.most_epochs,
            "epoch_lengths": self.epoch_lengths,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        same = (state_dict.get("budget_s"), state_dict.get("most")) == (
            self.budget_s,
            self.most_epochs,
        )
        self.planned = state_dict.get("planned") if same else None
        self.epoch_lengths = list(state_dict.get("epoch_lengths", []))
