import dataclasses
import io
import logging
import warnings
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from pytorch_lightning.utilities._pytree import _tree_flatten
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from moco.run.console import print_line
from moco.run.first_screen import RunFacts, RunSummary, format_duration, quiet_lightning


@pytest.fixture(autouse=True)
def lightning_logger_filters():
    """quiet_lightning() changes a global logger: each test starts and ends without its filter."""
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    saved, logger.filters = logger.filters, []
    yield
    logger.filters = saved


FACTS = RunFacts(
    experiment="moco_v2",
    data="fashion_mnist",
    image_size=28,
    backbone="resnet18",
    stem="small",
    batch_size=32,
    run_dir="runs/fashion_mnist/today",
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fake_trainer(steps_per_epoch=100, epochs=10, max_steps=-1, **overrides) -> SimpleNamespace:
    total = (
        epochs * steps_per_epoch if max_steps == -1 else min(max_steps, epochs * steps_per_epoch)
    )
    trainer = SimpleNamespace(
        estimated_stepping_batches=total,
        num_training_batches=steps_per_epoch,
        accumulate_grad_batches=1,
        max_epochs=epochs,
        max_steps=max_steps,
        world_size=1,
        num_devices=1,
        num_nodes=1,
        accelerator=CPUAccelerator(),
        precision="32-true",
        is_global_zero=True,
        global_step=0,
        current_epoch=0,
    )
    for key, value in overrides.items():
        setattr(trainer, key, value)
    return trainer


def run(
    trainer, step_s=0.5, epoch_end_s=0.0, until=None, first_steps_s=None, facts=FACTS, **kwargs
):
    """Drives the callback through a fit as Lightning would, with ``step_s`` per optimizer step
    (``first_steps_s`` for the first five) and ``epoch_end_s`` between epochs."""
    clock, lines = Clock(), []
    callback = RunSummary(facts, clock=clock, write=lines.append, **kwargs)
    callback.on_fit_start(trainer, None)
    callback.on_train_start(trainer, None)
    until = until or trainer.estimated_stepping_batches
    per_epoch = trainer.num_training_batches
    started = trainer.global_step
    while trainer.global_step < until:
        trainer.current_epoch = trainer.global_step // per_epoch
        callback.on_train_epoch_start(trainer, None)
        while trainer.global_step < until:
            slow = first_steps_s is not None and trainer.global_step - started < 5
            clock.now += first_steps_s if slow else step_s
            trainer.global_step += 1
            callback.on_train_batch_end(trainer, None, None, None, 0)
            if trainer.global_step % per_epoch == 0:
                break
        clock.now += epoch_end_s
    return lines


def timing_lines(lines):
    return [line for line in lines if line.startswith("timing:")]


def test_format_duration():
    assert format_duration(45) == "45 s"
    assert format_duration(52 * 60 + 10) == "52 min"
    assert format_duration(3 * 3600 + 61) == "3 h 01 min"
    assert format_duration(59.7) == "1 min"
    assert format_duration(150) == "3 min"  # halves round up, not to even


def test_summary_shows_the_given_values():
    trainer = fake_trainer(steps_per_epoch=468, epochs=20, world_size=2, num_devices=2)
    summary = run(trainer, until=1)[0].splitlines()
    assert 6 <= len(summary) <= 8
    text = "\n".join(summary)
    for expected in ("moco_v2", "fashion_mnist, 28 px", "resnet18, stem small", "32-true"):
        assert expected in text
    assert "20 epochs x 468 steps -> 9360 steps, global batch 64" in text
    assert "cpu x 2, 2 processes" in text
    assert "runs/fashion_mnist/today" in text
    assert all(line[11] == " " and line[12] != " " for line in summary)  # values aligned


def test_summary_says_when_the_last_block_has_no_relu():
    trainer = fake_trainer()
    assert "no ReLU after the last block" not in "\n".join(run(trainer, until=1)[0].splitlines())
    facts = dataclasses.replace(FACTS, final_relu=False)
    text = run(trainer, until=1, facts=facts)[0]
    assert "resnet18, stem small, no ReLU after the last block" in text


def test_summary_with_max_steps_and_nodes():
    trainer = fake_trainer(max_steps=250, accelerator=CUDAAccelerator(), num_nodes=2)
    summary = run(trainer, until=1)[0]
    assert "10 epochs x 100 steps, max_steps=250 -> 250 steps" in summary
    assert "cuda x 1 x 2 nodes" in summary


def test_summary_without_experiment():
    clock, lines = Clock(), []
    facts = RunFacts(None, "synthetic", 8, "resnet18", "small", 8, "/tmp/run")
    RunSummary(facts, clock=clock, write=lines.append).on_fit_start(fake_trainer(), None)
    assert "experiment  none (group defaults)" in lines[0]


def test_estimate_is_the_measured_rate_times_the_steps():
    lines = run(fake_trainer(), step_s=0.5)  # 1000 steps of 0.5 s
    (line,) = timing_lines(lines)
    # At step 25: 500 s for the run, 975 steps * 0.5 s left; batch 32 -> 64 img/s.
    assert line.startswith("timing: 2.00 it/s, 64 img/s -> about 8 min for 1000 steps (8 min left)")
    assert "not included" in line
    assert lines.index(line) == 1  # right after the summary, not at the end of the run


def test_warm_up_steps_are_left_out_of_the_rate():
    lines = run(fake_trainer(epochs=100), step_s=0.5, first_steps_s=30.0)  # 10000 steps
    (line,) = timing_lines(lines)
    assert "2.00 it/s" in line
    assert "about 1 h 23 min for 10000 steps" in line  # 10000 * 0.5 s = 5000 s


def test_epoch_end_time_corrects_the_estimate_once():
    lines = run(fake_trainer(), step_s=0.5, epoch_end_s=48.0)
    after = [line for line in lines if line.startswith("after epoch")]
    assert len(timing_lines(lines)) == 1
    # 1000 * 0.5 s + 10 epoch ends * 48 s = 980 s; at the start of epoch 2, 900 steps and 9
    # epoch ends are left: 450 s + 432 s.
    assert after == [
        "after epoch 1: 48 s of epoch-end work (kNN monitor, checkpoint) "
        "-> about 16 min for 1000 steps (15 min left)"
    ]


def test_short_epochs_put_the_epoch_end_time_into_the_timing_line():
    lines = run(fake_trainer(steps_per_epoch=10, epochs=100), step_s=0.5, epoch_end_s=20.0)
    (line,) = timing_lines(lines)
    # The epoch ends are not in the rate: 1000 * 0.5 s + 100 * 20 s = 2500 s.
    assert "2.00 it/s" in line
    assert "about 42 min for 1000 steps" in line
    assert "with 20 s per epoch end" in line
    assert not any(line.startswith("after epoch") for line in lines)


def test_under_a_time_budget_the_estimate_is_the_epochs_that_fit():
    facts = dataclasses.replace(FACTS, time_budget_minutes=5)
    lines = run(fake_trainer(), step_s=0.5, epoch_end_s=10.0, facts=facts)
    assert "the epochs that fit 5 min, at most 10 epochs x 100 steps -> 1000 steps" in lines[0]
    # 100 steps of 0.5 s: 50 s per epoch, without the epoch end 6 of them in 300 s.
    (timing,) = timing_lines(lines)
    assert "-> about 6 epochs fit the 5 min budget" in timing
    # After the first epoch the run's own plan speaks (moco.run.time_budget), not an estimate.
    assert not any(line.startswith("after epoch") for line in lines)


def test_only_rank_zero_prints():
    assert run(fake_trainer(is_global_zero=False), epoch_end_s=5.0) == []


def test_a_resumed_run_times_its_own_first_steps():
    trainer = fake_trainer(global_step=600)
    clock, lines = Clock(), []
    callback = RunSummary(FACTS, clock=clock, write=lines.append)
    callback.on_fit_start(trainer, None)
    callback.on_train_start(trainer, None)
    trainer.current_epoch = 6
    callback.on_train_epoch_start(trainer, None)
    for _ in range(24):
        clock.now += 0.5
        trainer.global_step += 1
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert timing_lines(lines) == []  # 24 steps since the resume: still timing
    clock.now += 0.5
    trainer.global_step += 1
    callback.on_train_batch_end(trainer, None, None, None, 0)
    (line,) = timing_lines(lines)
    # 375 steps of 0.5 s left after step 625.
    assert "about 8 min for 1000 steps (3 min left)" in line


@pytest.mark.parametrize("total", [1, 8, 30])
def test_a_short_run_still_gets_one_timing_line(total):
    lines = run(fake_trainer(steps_per_epoch=total, epochs=1), step_s=0.5)
    (line,) = timing_lines(lines)
    assert "2.00 it/s" in line


def test_quiet_lightning_silences_the_leafspec_warning_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)  # Lightning's own use of LeafSpec
        assert any("LeafSpec" in str(w.message) for w in caught)  # else this test proves nothing
        caught.clear()
        quiet_lightning()
        _tree_flatten(1)
        warnings.warn("another thing is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
    messages = [str(w.message) for w in caught]
    # Only Lightning's call is silenced: the same text from this module still shows.
    assert messages == [
        "another thing is deprecated",
        "`isinstance(treespec, LeafSpec)` is deprecated",
    ]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_quiet_lightning_drops_the_litlogger_tip_only():
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    records = Records()
    logger.addHandler(records)
    try:
        pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
        assert any("litlogger" in m for m in records.messages)  # else this test proves nothing
        records.messages.clear()
        quiet_lightning()
        quiet_lightning()  # twice is harmless
        pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False)
        rank_zero_info("another tip")
    finally:
        logger.removeHandler(records)
    assert not any("litlogger" in m for m in records.messages)
    assert any(m.startswith("GPU available") for m in records.messages)
    assert records.messages[-1] == "another tip"


def test_a_line_printed_into_a_log_file_starts_on_a_line_of_its_own():
    log = io.StringIO()  # not a terminal: the bar's carriage returns clear nothing there
    log.write("Epoch 3:  41%|####      | 192/468 [01:05<01:30, 2.93it/s]")  # no newline
    print_line("time budget: 24 epochs planned (5.1 of 60 min spent)", file=log)
    assert log.getvalue().splitlines()[-1] == "time budget: 24 epochs planned (5.1 of 60 min spent)"


def test_on_a_terminal_the_line_is_printed_as_it_is():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    print_line("time budget: 24 epochs planned", file=screen)
    assert screen.getvalue() == "time budget: 24 epochs planned\n"
