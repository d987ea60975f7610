"""A run that fills a time budget: as many epochs as fit, with the schedules ending at the last.

A fixed epoch count takes twice as long on one CPU as on another. With ``time_budget_minutes``
the run plans its length after every epoch from the training time spent so far (the
``TrainingClock``'s count): the epochs done plus as many of the mean epoch as the time left
holds, never more than ``trainer.max_epochs``. The lr and momentum schedules read the run's
length every step (``moco.optim.scheduled``), so the cosine ends at the last planned epoch; a
change of plan moves the rest of the curve by the change of one epoch in its length.

The plan is made on rank 0 and broadcast, so all processes stop after the same epoch, and it
travels in the checkpoints, so a resumed run keeps it.
"""

import math

import pytorch_lightning as pl

from moco.run.training_clock import TrainingClock


def planned_epochs(done: int, spent_s: float, budget_s: float, most: int) -> int:
    """The epochs a run should have when ``done`` of them took ``spent_s`` seconds of a budget of
    ``budget_s``: those done and as many more of their mean length as fit, at most ``most``."""
    if done < 1 or spent_s <= 0:
        return most
    more = math.floor(max(budget_s - spent_s, 0.0) / (spent_s / done))
    return max(done, min(done + more, most))


class TimeBudget(pl.Callback):
    """Sets the Trainer's ``max_epochs`` at the end of every epoch (see the module's docstring),
    to at most ``most_epochs`` (the config's ``trainer.max_epochs``).

    ``clock`` is the run's ``TrainingClock``, which must come before this callback in the
    Trainer's list so that it has counted the epoch.
    """

    def __init__(self, minutes: float, most_epochs: int, clock: TrainingClock) -> None:
        self.budget_s, self.most_epochs, self.clock = 60.0 * minutes, most_epochs, clock
        self.planned: int | None = None  # None until the first epoch has ended

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint's state was loaded: a resumed run goes on with its plan.
        if self.planned is not None:
            trainer.fit_loop.max_epochs = self.planned

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plan = planned_epochs(
            trainer.current_epoch + 1, self.clock.seconds, self.budget_s, self.most_epochs
        )
        plan = trainer.strategy.broadcast(plan, src=0)
        if plan != self.planned and trainer.is_global_zero:
            minutes_left = max(self.budget_s - self.clock.seconds, 0.0) / 60
            print(
                f"\nTime budget: {plan} epoch{'s' if plan != 1 else ''} planned "
                f"({self.clock.seconds / 60:.1f} of {self.budget_s / 60:g} min spent, "
                f"{minutes_left:.1f} left)"
            )
        self.planned = plan
        trainer.fit_loop.max_epochs = plan
        pl_module.log("time/planned_epochs", float(plan), rank_zero_only=True)

    def state_dict(self) -> dict:
        return {"planned": self.planned}

    def load_state_dict(self, state_dict: dict) -> None:
        self.planned = state_dict.get("planned")
