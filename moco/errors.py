"""User mistakes, reported as one actionable line (the scripts exit with code 2, no traceback),
and the planned stop of a run (``Preempted``), reported the same way with its own exit code."""

import signal
from pathlib import Path


class MocoUserError(Exception):
    """Base class: something the user can fix. The message says what is wrong and how to fix it."""


class ConfigError(MocoUserError):
    """An invalid or inconsistent configuration value."""


class DataError(MocoUserError):
    """Missing, empty or unreadable data."""


class TrainingDiverged(MocoUserError):
    """The loss or the weights became NaN or infinite; usually fixed by a lower learning rate."""


class Preempted(Exception):
    """The run saved a checkpoint and stopped on a stop signal (moco/run/within_epoch.py)."""

    def __init__(self, signum: int, step: int, path: Path, requeued: bool) -> None:
        name = signal.Signals(signum).name
        then = "the job is requeued" if requeued else "start it again to resume"
        super().__init__(f"{name} at step {step}: checkpoint {path} written; {then}")
        self.exit_code = 128 + signum  # what a shell reports for a process stopped by it
