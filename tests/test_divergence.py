"""A NaN or inf loss stops the run, naming its first step, without a host read every step.

moco/divergence.py remembers the first bad loss on the device and reads it back only at the
checks: every log_every_n_steps optimizer steps, after the last batch of an epoch or of the run,
before every checkpoint and at the end of training.
"""

import functools
import re
from types import SimpleNamespace

import hydra
import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY_OVERRIDES, compose_config, run_on_two_ranks
from pytorch_lightning.callbacks import ModelCheckpoint

from moco import MoCo, divergence
from moco.data import PretrainDataModule
from moco.divergence import DivergenceGuard, refuse_non_finite_weights
from moco.errors import TrainingDiverged

NAN, INF = float("nan"), float("inf")
ADVICE = "lower optimizer.lr or set scheduler.warmup_epochs, then resume from the last checkpoint"


def _message(value: str, step: int, epoch: int) -> str:
    return f"the loss became {value} at step {step}, epoch {epoch}: {ADVICE}"


def _trainer(step: int, every: int = 4, last: bool = False, max_steps: int = -1):
    """The Trainer attributes DivergenceGuard.after_batch reads."""
    return SimpleNamespace(
        global_step=step, log_every_n_steps=every, is_last_batch=last, max_steps=max_steps
    )


@pytest.fixture
def reads(monkeypatch) -> list[int]:
    """The checks that read the remembered loss back (one gather each), by the step count."""
    counted: list[int] = []
    real = divergence.gather

    def counting(tensor):
        counted.append(1)
        return real(tensor)

    monkeypatch.setattr(divergence, "gather", counting)
    return counted


# ------------------------------------------------------------------------------ the guard
def test_the_first_bad_step_is_reported_not_the_step_of_the_check():
    guard = DivergenceGuard()
    for step, loss in enumerate([1.0, 0.9, NAN, INF, 0.8]):  # bad from step 2 on
        guard.observe(torch.tensor(loss), step, epoch=1)
    with pytest.raises(TrainingDiverged) as info:
        guard.after_batch(_trainer(step=8, every=4))
    assert str(info.value) == _message("nan", 2, 1)
    with pytest.raises(TrainingDiverged, match="at step 2, epoch 1"):
        guard.check()  # the verdict sticks: a later checkpoint is refused too


def test_observing_a_loss_reads_nothing_back_to_the_host(monkeypatch):
    guard = DivergenceGuard()
    guard.observe(torch.tensor(1.0), 0, 0)  # the first call makes the state tensors

    def no_host_read(*args, **kwargs):
        raise AssertionError("a per-step host read of a tensor")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, no_host_read)
    for step, loss in enumerate([0.5, NAN, 0.4, INF], start=1):
        guard.observe(torch.tensor(loss), step, 0)
        guard.after_batch(_trainer(step=step + 1, every=100))  # not a check step: no read
    monkeypatch.undo()
    with pytest.raises(TrainingDiverged, match="nan at step 2, epoch 0"):
        guard.check()


def test_checks_follow_the_log_interval_and_the_ends_of_epochs(reads):
    guard = DivergenceGuard()
    checked = []
    for step in range(1, 13):  # optimizer steps; the epoch has 7 batches, then 5 more
        guard.observe(torch.tensor(1.0), step - 1, epoch=0 if step <= 7 else 1)
        before = len(reads)
        guard.after_batch(_trainer(step, every=4, last=step == 7, max_steps=12))
        if len(reads) > before:
            checked.append(step)
    assert checked == [4, 7, 8, 12]  # every 4 steps, the epoch's last batch, the run's last step
    guard.check()  # end of training: nothing new since step 12, so nothing is read
    assert len(reads) == 4


def test_gradient_accumulation_checks_a_step_once(reads):
    guard = DivergenceGuard()
    for batch in range(8):  # 2 batches per optimizer step
        guard.observe(torch.tensor(1.0), batch // 2, 0)
        guard.after_batch(_trainer(step=(batch + 1) // 2, every=2))
    assert len(reads) == 2  # at steps 2 and 4, once each


def test_logging_switched_off_still_checks_at_the_fallback_interval(reads):
    guard = DivergenceGuard()
    for step in range(1, 101):
        guard.observe(torch.tensor(1.0), step - 1, 0)
        guard.after_batch(_trainer(step, every=0))
    assert len(reads) == 100 // divergence._FALLBACK_EVERY


# ------------------------------------------------------------------- in the LightningModules
def test_a_checkpoint_after_a_bad_loss_is_refused_before_the_weights_are_looked_at(tiny_moco):
    model, _ = tiny_moco()
    model.divergence.observe(torch.tensor(1.0), 2, 0)
    model.on_save_checkpoint({"state_dict": model.state_dict()})  # finite: fine
    model.divergence.observe(torch.tensor(NAN), 3, 0)
    with pytest.raises(TrainingDiverged, match=re.escape(_message("nan", 3, 0))):
        model.on_save_checkpoint({"state_dict": model.state_dict()})  # finite weights, bad loss


def test_the_supervised_reference_has_the_same_guard():
    data_only = [o for o in TINY_OVERRIDES if o.startswith("data")]
    model = hydra.utils.instantiate(compose_config([*data_only, "+experiment=supervised"]).model)
    model.divergence.observe(torch.tensor(INF), 5, 1)
    with pytest.raises(TrainingDiverged, match="the loss became inf at step 5, epoch 1"):
        model.on_save_checkpoint({"state_dict": model.state_dict()})
    state = model.state_dict()
    state["encoder_q.head.weight"][0, 0] = NAN
    with pytest.raises(TrainingDiverged, match="encoder_q.head.weight holds NaN or inf"):
        refuse_non_finite_weights(state, 5, 1)


class NaNAt(MoCo):
    """MoCo whose loss is NaN at optimizer step ``bad_step`` (and, through the weights, after)."""

    bad_step = -1

    def contrast(self, im_q, im_k, negatives):
        loss, logits, keys = super().contrast(im_q, im_k, negatives)
        if self.global_step == self.bad_step:
            loss = loss * NAN
        return loss, logits, keys


def _fit(bad_step: int, *, log_every: int, callbacks=(), max_steps: int = 8) -> pl.Trainer:
    """Fit the tiny MoCo (64 images, batch 8: 8 steps an epoch) on the CPU; returns the trainer
    whether or not the fit raised (the exception propagates)."""
    cfg = compose_config(list(TINY_OVERRIDES))
    cfg.model._target_ = f"{__name__}.NaNAt"
    model = hydra.utils.instantiate(cfg.model)
    model.bad_step = bad_step
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        log_every_n_steps=log_every,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(model, datamodule=PretrainDataModule(cfg.data, cfg.augment))
    return trainer


class LastStep(pl.Callback):
    """The optimizer step of the last batch that ended (callbacks run before the module's own
    on_train_batch_end, where the check raises)."""

    step = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step = trainer.global_step


def test_a_fit_stops_at_the_next_check_naming_the_first_bad_step():
    last = LastStep()
    with pytest.raises(TrainingDiverged, match=re.escape(_message("nan", 1, 0))):
        _fit(bad_step=1, log_every=3, callbacks=[last])
    assert last.step == 3  # the first check after step 1


def test_a_finite_fit_reads_the_loss_back_only_at_the_checks(reads):
    _fit(bad_step=-1, log_every=3)  # 8 steps, one epoch
    assert len(reads) == 3  # steps 3, 6 and 8 (the epoch's last batch); train end: nothing new


def test_no_checkpoint_is_written_after_a_bad_loss(tmp_path):
    every_2_steps = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 3, epoch 0"):
        _fit(bad_step=3, log_every=50, callbacks=[every_2_steps])  # no cadence check before
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["epoch=0-step=2.ckpt"], saved  # the one at step 4 was refused


# ------------------------------------------------------------------------- two processes
def _stop(action) -> str:
    """The message ``action`` raised, or "" if it returned."""
    try:
        action()
    except TrainingDiverged as exc:
        return str(exc)
    return ""


def _two_rank_checks(rank: int) -> dict:
    # Rank 1's loss is NaN from step 2, rank 0's only becomes inf at step 3.
    losses = {0: [1.0, 1.0, 1.0, INF, INF, INF], 1: [1.0, 1.0, NAN, NAN, NAN, NAN]}[rank]
    guard, stopped = DivergenceGuard(), None
    for step, loss in enumerate(losses):
        guard.observe(torch.tensor(loss), step, epoch=0)
        message = _stop(functools.partial(guard.after_batch, _trainer(step + 1, every=2)))
        if message:
            stopped = (step + 1, message)
            break
    # A BatchNorm statistic gone bad on rank 1 only: both refuse to checkpoint.
    state = {"bn.running_var": torch.tensor([1.0, INF if rank == 1 else 1.0])}
    weights = _stop(functools.partial(refuse_non_finite_weights, state, 9, 1))
    return {"stopped": stopped, "weights": weights}


@pytest.mark.slow  # two spawned processes, each importing Lightning and Hydra
def test_a_nan_on_one_rank_stops_both_at_the_same_step_with_the_same_message(tmp_path):
    ranks = run_on_two_ranks(_two_rank_checks, tmp_path)
    expected = (4, _message("nan", 2, 0))
    assert [r["stopped"] for r in ranks] == [expected, expected]
    assert ranks[1]["weights"].startswith("bn.running_var holds NaN or inf at step 9, epoch 1")
    assert ranks[0]["weights"].startswith("a tensor of another process holds NaN or inf")
