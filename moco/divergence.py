"""Stopping a run whose loss became NaN or infinite, without reading the loss every step.

Reading a loss on the host (``bool(torch.isfinite(loss))``, ``loss.item()``) makes the CPU wait
for every kernel queued so far, and asking the other ranks is an all_reduce on top. Done every
step, both keep the GPU from running ahead of Python. So each step only *remembers*, on the
device, the first non-finite loss (its value, step and epoch: a few ``torch.where``), and the
remembered value is read, and compared across ranks, at a few moments only:

- every ``trainer.log_every_n_steps`` optimizer steps. At those steps Lightning 2.6 already turns
  the values logged with ``self.log(..., on_step=True)`` into Python numbers for the loggers
  (``_LoggerConnector.update_train_step_metrics`` -> ``log_metrics`` ->
  ``convert_tensors_to_scalars``, when a logger is attached), so the queue of kernels is drained
  there anyway and the check costs no wait of its own. (Values logged with ``prog_bar=True``
  are read back after every batch, whatever the interval: that read is Lightning's, in
  ``_ResultCollection.metrics``, and stays as long as the loss is shown in the progress bar);
- after the last batch of every epoch and the last step of the run, before the epoch-end
  callbacks (the kNN monitor, the checkpoint) see the weights;
- before every checkpoint, so that no checkpoint is written after a non-finite loss;
- at the end of training, so a run never ends "successfully" with a NaN in its last steps.

A run therefore goes on for at most one check interval after its loss became NaN (its
weights are then NaN too), but the error still names the first bad step, and no checkpoint of
those steps exists. Under DDP every check is a collective: it happens at the same step on every
rank (the step count and the number of batches are equal on all of them), and every rank reaches
the same verdict with the same message, so all of them stop together and none waits forever.
"""

import torch

from moco.distributed import all_ranks, gather
from moco.errors import TrainingDiverged

# When logging is off (log_every_n_steps=0) Lightning reads nothing back; check at its default.
_FALLBACK_EVERY = 50
_NONE = torch.iinfo(torch.int64).max  # "no bad step yet", larger than any step for the min


class DivergenceGuard:
    """The first non-finite training loss, remembered on the device and reported when checked.

    A LightningModule calls :meth:`observe` in ``training_step``, :meth:`after_batch` in
    ``on_train_batch_end``, and :meth:`check` in ``on_train_end`` and ``on_save_checkpoint``.
    The state is not saved in checkpoints: a checkpoint never holds a diverged run.
    """

    def __init__(self) -> None:
        self._step: torch.Tensor | None = None  # (1,) int64 on the loss's device; _NONE: none
        self._epoch: torch.Tensor | None = None  # (1,) int64
        self._value: torch.Tensor | None = None  # (1,) float32: the first non-finite loss
        # Host counters (no device read): equal on every rank, so every rank skips the same
        # checks and the collectives stay matched.
        self._observed = 0  # losses observed
        self._observed_at_check = 0  # ... when the last check ran
        self._step_checked = 0  # the optimizer step of the last cadence check (none at step 0)
        self._verdict: str | None = None  # the error, once a check found a bad loss

    def observe(self, loss: torch.Tensor, step: int, epoch: int) -> None:
        """Remember ``loss`` if it is the first non-finite one. No host read, no collective."""
        loss = loss.detach().float().reshape(1)
        if self._step is None:
            self._step = torch.full((1,), _NONE, dtype=torch.int64, device=loss.device)
            self._epoch = torch.zeros(1, dtype=torch.int64, device=loss.device)
            self._value = torch.zeros(1, device=loss.device)
        elif self._step.device != loss.device:  # the model moved (a second fit elsewhere)
            self._step, self._epoch, self._value = (
                t.to(loss.device) for t in (self._step, self._epoch, self._value)
            )
        first = ~torch.isfinite(loss) & (self._step == _NONE)
        # Python numbers as torch.where's operands travel with the kernel launch: no copy to
        # the device, which would wait like a read does.
        self._step = torch.where(first, step, self._step)
        self._epoch = torch.where(first, epoch, self._epoch)
        self._value = torch.where(first, loss, self._value)
        self._observed += 1

    def after_batch(self, trainer) -> None:
        """Check when the batch that just ended was the last of the epoch or of the run, or
        completed a multiple of the check interval in optimizer steps (see the module doc)."""
        step = trainer.global_step
        every = trainer.log_every_n_steps or _FALLBACK_EVERY
        # Under gradient accumulation the step stays the same for several batches: check once.
        on_cadence = step % every == 0 and step != self._step_checked
        if on_cadence or trainer.is_last_batch or step == trainer.max_steps:
            self._step_checked = step
            self.check()

    def check(self) -> None:
        """Raise TrainingDiverged if any rank saw a non-finite loss. A collective under DDP."""
        if self._verdict is not None:
            raise TrainingDiverged(self._verdict)
        if self._observed == self._observed_at_check:
            return  # nothing new since the last check (on every rank alike)
        self._observed_at_check = self._observed
        # Every rank learns every rank's first bad step; the earliest one is reported, by all.
        steps = gather(self._step).tolist()
        if min(steps) == _NONE:
            return
        epochs, values = gather(self._epoch).tolist(), gather(self._value).tolist()
        first = steps.index(min(steps))
        self._verdict = (
            f"the loss became {values[first]} at step {steps[first]}, epoch {epochs[first]}: "
            "lower optimizer.lr or set scheduler.warmup_epochs, then resume from the last "
            "checkpoint"
        )
        raise TrainingDiverged(self._verdict)


def refuse_non_finite_weights(state_dict: dict, step: int, epoch: int) -> None:
    """Raise TrainingDiverged when a floating-point tensor of ``state_dict`` holds NaN or inf:
    such weights can be neither trained nor evaluated, so no checkpoint of them is written.
    A collective under DDP (called while saving, which every rank does), so a buffer that went
    bad on one rank only (BatchNorm statistics are per rank) stops every rank."""
    bad = next(
        (
            name
            for name, tensor in state_dict.items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()
        ),
        None,
    )
    device = next((t.device for t in state_dict.values()), "cpu")
    if all_ranks(bad is None, device):
        return
    where = f"{bad} holds NaN or inf" if bad else "a tensor of another process holds NaN or inf"
    raise TrainingDiverged(
        f"{where} at step {step}, epoch {epoch}; no checkpoint written: lower optimizer.lr and "
        "resume from the last checkpoint"
    )
