"""MoCo across processes: real 2-process runs on CPU with gloo, as CI has no GPU.

The helpers of moco/distributed.py run in two processes started by torch.multiprocessing; the
model runs in a 2-process Lightning DDP fit. Each process saves what it saw to a file and the
test process compares the files, so a failure shows as a plain assertion here.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TINY_OVERRIDES, WORLD, compose_config, run_on_two_ranks
from torch import nn

from moco import MoCo, distributed
from moco.data import PretrainDataModule
from moco.run.launch import launched_devices, launched_nodes, run_stamp

REPO = Path(__file__).resolve().parents[1]
BATCH = 6  # per rank


def _own_batch(rank: int) -> torch.Tensor:
    # Row i of rank r holds the global sample id r*BATCH + i in every entry.
    ids = torch.arange(rank * BATCH, (rank + 1) * BATCH, dtype=torch.float32)
    return ids.view(-1, 1, 1, 1).expand(-1, 2, 3, 3).clone()  # B x 2 x 3 x 3


def _shuffle_round_trip(rank: int) -> dict:
    torch.manual_seed(100 + rank)  # different generators: only rank 0's permutation may count
    images = _own_batch(rank)
    shuffled, perm = distributed.shuffle_batch(images)
    restored = distributed.unshuffle_batch(shuffled, perm)
    # A batch-dependent "encoder": each sample minus the mean of the batch it is encoded in.
    centred = distributed.encode_shuffled(lambda x: x - x.mean(0, keepdim=True), images)
    return {
        "images": images,
        "shuffled_ids": shuffled[:, 0, 0, 0],
        "restored": restored,
        "centred": centred,
        "gathered": distributed.gather(torch.full((2, 3), float(rank))),
    }


def test_shuffle_across_ranks_mixes_ranks_and_unshuffle_restores_each_rank(tmp_path):
    ranks = run_on_two_ranks(_shuffle_round_trip, tmp_path)
    all_ids = torch.cat([r["shuffled_ids"] for r in ranks])
    # Every global sample is encoded exactly once, on some rank.
    assert sorted(all_ids.tolist()) == list(range(WORLD * BATCH))
    for rank, seen in enumerate(ranks):
        assert torch.equal(seen["restored"], seen["images"])  # own samples, own order
        ids = seen["shuffled_ids"]
        others = (ids < rank * BATCH) | (ids >= (rank + 1) * BATCH)
        assert others.any(), f"rank {rank} encoded only its own samples: {ids.tolist()}"
        # Sample i's output came back to row i, computed in a batch of other ranks' samples too.
        own_mean = seen["images"].mean(0, keepdim=True)
        assert not torch.allclose(seen["centred"], seen["images"] - own_mean)
    # Gather: rank order, every rank the same result.
    expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    assert all(torch.equal(r["gathered"], expected) for r in ranks)


def _broadcast_bn(rank: int) -> dict:
    bn = nn.BatchNorm2d(3)
    bn.train()(torch.randn(4, 3, 2, 2) + rank)  # running stats differ per rank
    distributed.broadcast_buffers(bn)
    return {"mean": bn.running_mean, "var": bn.running_var}


def test_broadcast_buffers_gives_every_rank_rank0s_statistics(tmp_path):
    ranks = run_on_two_ranks(_broadcast_bn, tmp_path)
    assert torch.equal(ranks[0]["mean"], ranks[1]["mean"])
    assert torch.equal(ranks[0]["var"], ranks[1]["var"])


def test_single_process_helpers_are_plain_shuffles():
    images = _own_batch(0)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather(images) is images
    shuffled, perm = distributed.shuffle_batch(images)
    assert sorted(shuffled[:, 0, 0, 0].tolist()) == images[:, 0, 0, 0].tolist()
    assert torch.equal(distributed.unshuffle_batch(shuffled, perm), images)


# ------------------------------------------------------------------ the model in Lightning DDP
STEPS = 5
QUEUE = 4 * BATCH + BATCH // 2  # not a multiple of the global batch: the pointer wraps mid-batch


class RecordingMoCo(MoCo):
    """MoCo whose key encoder normalises with running statistics (eval-mode BN), so that a key
    depends on its own image only and can be recomputed without the shuffle; it keeps each
    step's key images for that check."""

    def contrast(self, im_q, im_k, negatives):
        self.encoder_k.eval()  # Lightning sets each module's mode itself, so here, every step
        self.last_im_k = im_k
        return super().contrast(im_q, im_k, negatives)


class QueueChecker(pl.Callback):
    """Per step: the queue rows just written hold rank 0's keys then rank 1's; at the end, saves
    this rank's queue and findings to out_dir/rank<r>.pt."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir, self.key_errors, self.lrs = out_dir, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ptr_before = int(pl_module.queue.ptr)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with torch.no_grad():  # this rank's keys, recomputed without any shuffle
            own = F.normalize(pl_module.encoder_k(pl_module.last_im_k), dim=1)
        expected = pl_module.all_gather(own).reshape(-1, own.shape[1])  # rank 0, then rank 1
        rows = (torch.arange(len(expected)) + self.ptr_before) % pl_module.queue.size
        self.key_errors.append((pl_module.queue.keys[rows] - expected).abs().max().item())
        self.lrs.append(trainer.optimizers[0].param_groups[0]["initial_lr"])

    def on_train_end(self, trainer, pl_module):
        findings = {
            "keys": pl_module.queue.keys.clone(),
            "ptr": int(pl_module.queue.ptr),
            "key_errors": self.key_errors,
            "lrs": self.lrs,
            "base_lr": pl_module.hparams.optimizer["lr"],
            "reference_batch": pl_module.hparams.lr_reference_batch,
        }
        torch.save(findings, self.out_dir / f"rank{trainer.global_rank}.pt")


def _ddp_model_run(tmp_path: Path) -> None:
    """Fit the tiny MoCo for STEPS steps in 2 CPU processes (Lightning DDP, gloo)."""
    cfg = compose_config([*TINY_OVERRIDES, f"data.batch_size={BATCH}", f"model.queue_size={QUEUE}"])
    cfg.model._target_ = f"{__name__}.RecordingMoCo"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD,
        # As conf/trainer/ddp.yaml, with processes spawned from this test process.
        strategy=distributed.ddp_strategy(start_method="spawn"),
        use_distributed_sampler=False,  # the data module splits the epoch (as moco/run/train.py)
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[QueueChecker(tmp_path)],
    )
    model = hydra.utils.instantiate(cfg.model)
    trainer.fit(model, datamodule=PretrainDataModule(cfg.data, cfg.augment))


@pytest.mark.slow
def test_two_process_fit_keeps_identical_queues_of_both_ranks_keys(tmp_path):
    _ddp_model_run(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    global_batch = WORLD * BATCH
    assert torch.equal(ranks[0]["keys"], ranks[1]["keys"])  # bit-identical queues
    assert ranks[0]["ptr"] == ranks[1]["ptr"] == STEPS * global_batch % QUEUE
    for seen in ranks:
        # Each step wrote, at the old pointer, the keys of rank 0's samples then rank 1's.
        assert len(seen["key_errors"]) == STEPS
        assert max(seen["key_errors"]) < 1e-5, seen["key_errors"]
        # The lr follows the global batch: batch x processes.
        expected_lr = seen["base_lr"] * global_batch / seen["reference_batch"]
        assert seen["lrs"] == pytest.approx([expected_lr] * STEPS)


# ------------------------------------------------------------------------ torchrun, end to end
_ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun_pretrain(*overrides: str) -> list[str]:
    """scripts/pretrain.py in 2 CPU processes under torchrun, tiny."""
    return [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nproc-per-node=2",
        str(REPO / "scripts" / "pretrain.py"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "eval.enabled=false",
        "data=synthetic",
        "data.image_size=8",
        "data.batch_size=8",
        "model.bn_splits=2",
        "model.queue_size=64",
        "model.dim=16",
        *overrides,
    ]


@pytest.mark.slow
def test_torchrun_two_processes_write_one_run_directory_and_one_checkpoint(tmp_path):
    result = subprocess.run(
        _torchrun_pretrain("trainer.max_epochs=1", "data.num_train=64"),
        cwd=tmp_path,  # relative run directories land here
        env=_ONE_THREAD,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "runs" / "synthetic").iterdir())
    assert len(run_dirs) == 1, run_dirs  # not one per process
    run_dir = run_dirs[0]
    assert "torchrun-" in run_dir.name
    real_files = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.is_symlink()]
    assert real_files == ["epoch000.ckpt"]  # one checkpoint, written by rank 0
    assert (run_dir / "checkpoints" / "last.ckpt").resolve().name == "epoch000.ckpt"
    assert result.stdout.count("Done. Last checkpoint:") == 1  # printed by rank 0 only
    checkpoint = torch.load(run_dir / "checkpoints" / "epoch000.ckpt", weights_only=True)
    # 64 images, 2 processes x batch 8: 4 steps of 16 keys; 64 % 64 = 0 once the queue is full.
    assert checkpoint["global_step"] == 4
    assert checkpoint["hyper_parameters"]["batch_size"] == 8
    assert int(checkpoint["state_dict"]["queue.ptr"]) == 64 % 64


def test_launcher_resolvers_read_torchrun_and_slurm(monkeypatch):
    for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    slurm = ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_ID")
    for variable in (*slurm, "SLURM_STEP_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(variable, raising=False)
    assert launched_devices() == "auto" and launched_nodes() == 1
    assert "torchrun" not in run_stamp() and "slurm" not in run_stamp()

    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abcdef123456")
    assert launched_devices() == 4 and launched_nodes() == 2
    assert run_stamp().endswith("_torchrun-abcdef12")

    for variable in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable)
    monkeypatch.setenv("SLURM_NTASKS", "6")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "2(x3)")
    monkeypatch.setenv("SLURM_NNODES", "3")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    assert launched_devices() == 2 and launched_nodes() == 3
    assert "slurm" not in run_stamp()  # salloc's shell, not a task started by srun
    # Under srun: the job's id alone, no date or step, so a requeued job finds its directory.
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert run_stamp() == "slurm-777"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "770")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert run_stamp() == "slurm-770_7"


def test_ddp_trainer_config_builds_ddp_without_per_step_buffer_broadcast():
    from pytorch_lightning.strategies import DDPStrategy

    from moco.run.train import _trainer_args

    strategy = _trainer_args(compose_config(["trainer=ddp"]))["strategy"]
    assert isinstance(strategy, DDPStrategy)
    kwargs = strategy._ddp_kwargs
    assert kwargs.get("forward_sync_buffers", kwargs.get("broadcast_buffers")) is False


# ------------------------------------------------------------- stop signals under DDP
def _stop_on_one_rank(rank: int) -> dict:
    """Only rank 0 gets the signal; both ranks must write the checkpoint and stop together."""
    from types import SimpleNamespace

    from moco.errors import Preempted
    from moco.run.within_epoch import WithinEpochCheckpoints

    saved = []
    trainer = SimpleNamespace(
        global_step=0,
        world_size=WORLD,
        is_global_zero=rank == 0,
        log_every_n_steps=10,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        save_checkpoint=lambda path, weights_only=False: saved.append(trainer.global_step),
    )
    callback = WithinEpochCheckpoints("last.ckpt", requeue=False)
    for step in range(1, 30):
        if rank == 0 and step == 2:
            callback._signal = 15  # what the SIGTERM handler does, on this rank alone
        trainer.global_step = step
        try:
            callback.on_train_batch_end(trainer, None, None, None, step - 1)
        except Preempted as stop:
            return {"saved": saved, "stopped_at": step, "exit_code": stop.exit_code}
    return {"saved": saved, "stopped_at": None}


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    ranks = run_on_two_ranks(_stop_on_one_rank, tmp_path)
    # The ranks agree every AGREE_EVERY_N_STEPS (5) steps: both learn of it at step 5.
    assert ranks[0] == ranks[1] == {"saved": [5], "stopped_at": 5, "exit_code": 128 + 15}


@pytest.mark.slow
def test_torchrun_run_stopped_by_sigterm_mid_epoch_resumes_to_the_same_weights(tmp_path):
    """SIGTERM to every process of a 2-process torchrun run, part-way through an epoch: both
    ranks write one checkpoint at the same step and stop; started again, the run ends with the
    weights (the queue too) of a run never stopped."""
    command = _torchrun_pretrain(
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "data.num_train=96",  # 2 processes x batch 8: 6 steps per epoch
        "data.num_workers=1",
    )

    def train(run_dir: Path) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*command, f"hydra.run.dir={run_dir}"],
            env=_ONE_THREAD,
            capture_output=True,
            text=True,
            timeout=600,  # a hung rank fails the test instead of stalling the suite
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    train(tmp_path / "straight")
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        [*command, f"hydra.run.dir={stopped}"],
        env=_ONE_THREAD,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 600
    while not (stopped / "checkpoints" / "epoch000.ckpt").exists():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("no checkpoint after epoch 0 within 600 s")
        time.sleep(0.05)
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)  # torchrun, both ranks and their loader workers
    process.wait(timeout=300)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert stderr.count("stopped: SIGTERM at step ") == 1, stderr[-3000:]  # said by rank 0
    resumed = train(stopped)
    step = int(resumed.stdout.split("(step ")[1].split(")")[0])
    assert 6 < step < 12, step  # part-way through epoch 1
    expected, final = (
        torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for d in (tmp_path / "straight", stopped)
    )
    assert [k for k in expected if not torch.equal(expected[k], final[k])] == []
