"""A run that fills a time budget: as many epochs as fit, with the schedules ending at the last.

A fixed epoch count takes twice as long on one CPU as on another. With ``time_budget_minutes``
the run plans its length after every epoch from the training time spent so far (the
``TrainingClock``'s count): the epochs done plus as many of the mean epoch as the time left
holds, never more than ``trainer.max_epochs``. The lr and momentum schedules read the run's
length every step (``moco.optim.scheduled``), so the cosine ends at the last planned epoch.

A plan may grow only early in the run, while fewer than ``growth_window`` of its planned epochs
are done: half of them, or fewer if a step schedule drops the lr sooner. There a longer run lifts
the lr by a hair (a 24-epoch cosine made 25 after epoch 6 rises by about 1%) and undoes no drop.
Later a plan only shrinks, as growing it would lift a cosine that is nearly done. So a slow first
epoch, or a minute that another job took, does not cut the whole run short.

The plan is made on rank 0 and broadcast, so all processes stop after the same epoch. It travels
in the checkpoints with the budget it was made for: a run resumed with the same budget and bound
keeps it, one resumed with another plans afresh after its next epoch.
"""

import math

import pytorch_lightning as pl

from moco.run.console import print_line
from moco.run.training_clock import TrainingClock


def planned_epochs(done: int, spent_s: float, budget_s: float, most: int) -> int:
    """The epochs a run should have when ``done`` of them took ``spent_s`` seconds of a budget of
    ``budget_s``: those done and as many more of their mean length as fit, at most ``most``."""
    if done < 1 or spent_s <= 0:
        return most
    more = math.floor(max(budget_s - spent_s, 0.0) / (spent_s / done))
    return max(done, min(done + more, most))


def growth_window(scheduler_cfg) -> float:
    """The share of a plan's epochs before which it may still grow: half, or the first milestone
    of a step schedule if that comes earlier (a later end must not undo a drop)."""
    milestones = []
    if scheduler_cfg.name == "step":
        milestones = list(scheduler_cfg.get("milestones") or [])
    return min([0.5, *milestones])


class TimeBudget(pl.Callback):
    """Sets the Trainer's ``max_epochs`` at the end of every epoch (see the module's docstring),
    to at most ``most_epochs`` (the config's ``trainer.max_epochs``).

    ``clock`` is the run's ``TrainingClock``, which must come before this callback in the
    Trainer's list so that it has counted the epoch.
    """

    def __init__(
        self, minutes: float, most_epochs: int, clock: TrainingClock, growth_window: float = 0.5
    ) -> None:
        self.budget_s, self.most_epochs, self.clock = 60.0 * minutes, most_epochs, clock
        self.growth_window = growth_window
        self.planned: int | None = None  # None until the first epoch has ended

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's state was loaded: a resumed run goes on with its plan.
        if self.planned is not None:
            trainer.fit_loop.max_epochs = self.planned

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1
        plan = planned_epochs(done, self.clock.seconds, self.budget_s, self.most_epochs)
        if self.planned is not None and done >= self.growth_window * self.planned:
            plan = min(plan, self.planned)
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

    def state_dict(self) -> dict:
        return {"planned": self.planned, "budget_s": self.budget_s, "most": self.most_epochs}

    def load_state_dict(self, state_dict: dict) -> None:
        same = (state_dict.get("budget_s"), state_dict.get("most")) == (
            self.budget_s,
            self.most_epochs,
        )
        self.planned = state_dict.get("planned") if same else None
