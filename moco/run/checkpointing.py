"""Checkpoints a run can continue from exactly: what they hold beyond Lightning's own state, how
they reach the disk, and which one a run resumes from.

Lightning already saves both encoders, the queue and its pointer (buffers of the module), the
optimizer and LR-schedule state, epoch and step. Added here: the random-number generators of
every process, so that the augmentations, the sampler's order and the shuffle-BN permutations
after a resume are the ones an uninterrupted run would have drawn. Data-loader workers need no
state of their own: each image's random draws come from its own seed (moco/data/sampler.py), and
the data module's position in the epoch is in the checkpoint too.
"""

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from moco import distributed
from moco.checkpoint import read_moco_checkpoint, state_dict_mismatch
from moco.errors import ConfigError
from moco.run.metrics_log import EPOCH_ROW

RESUME_CHOICES = "auto (the newest checkpoint of this run directory), none, or a .ckpt path"


# ------------------------------------------------------------------------- random states
def _local_random_states() -> dict:
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        # numpy's state as tensors and numbers: checkpoints are read with weights_only=True,
        # which refuses numpy arrays.
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_local_random_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomStates(pl.Callback):
    """Saves the generators of torch, numpy and Python of every process in each checkpoint and
    restores this process's on resume."""

    def state_dict(self) -> dict:
        # Called on every process while a checkpoint is assembled; rank 0 writes the file, so
        # it must hold the states of all ranks.
        return {"per_rank": distributed.gather_objects(_local_random_states())}

    def load_state_dict(self, state_dict: dict) -> None:
        per_rank = state_dict["per_rank"]
        if len(per_rank) != distributed.world_size():
            pl.utilities.rank_zero_warn(
                f"the checkpoint holds random states of {len(per_rank)} processes, this run has "
                f"{distributed.world_size()}: training continues, but not bit for bit"
            )
            return
        _restore_local_random_states(per_rank[distributed.rank()])


# ------------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint under a temporary name and renames it into place.

    A process killed mid-write leaves ``<name>.partial`` behind, never a truncated file under the
    real name, so the previous checkpoints stay intact and ``resume=auto`` ignores the remains.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(partial, path)


# ------------------------------------------------------------------------------ resuming
def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint file of ``run_dir``, or None.

    last.ckpt is a link; the files it may point to are considered directly, so a run killed
    between writing a checkpoint and moving the link still resumes from the newest one.
    """
    folder = run_dir / "checkpoints"
    files = [p for p in folder.glob("*.ckpt") if p.is_file() and not p.is_symlink()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


@dataclass(frozen=True)
class ResumePoint:
    path: Path  # the checkpoint
    global_step: int  # optimizer steps it was taken after
    epoch_row: dict | None  # the log row of the epoch it ends, if it was written at an epoch's end


def resume_checkpoint(resume: str, run_dir: Path, model: pl.LightningModule) -> ResumePoint | None:
    """The checkpoint to continue from (checked to fit ``model``), or None to start fresh."""
    choice = str(resume)
    if choice == "none":
        return None
    if choice == "auto":
        path = newest_checkpoint(run_dir)
        if path is None:
            return None
    else:
        path = Path(choice).expanduser()
        if path.is_dir():
            raise ConfigError(f"resume={choice} is a directory: use {RESUME_CHOICES}")
    checkpoint = read_moco_checkpoint(path, option="resume")
    changed = changed_settings(checkpoint.get("hyper_parameters", {}), dict(model.hparams))
    problem = state_dict_mismatch(model.state_dict(), checkpoint["state_dict"])
    if problem:
        # The changed settings name the override that fixes it, e.g. a stem chosen by machine
        # kind (${moco.stem_for_machine:}) that differs on the machine the run resumes on.
        differ = f"; settings: {changed}" if changed else ""
        raise ConfigError(
            f"resume={path} was written by a different model ({problem}{differ}): resume with "
            "that run's settings (its config.yaml), or start fresh with resume=none"
        )
    if changed:
        # Allowed (a longer schedule, another lr), but never silently: a recipe or default
        # that changed since the run started (say T) would otherwise slip into the run.
        pl.utilities.rank_zero_warn(
            f"resuming {path} with settings that differ from the checkpoint's: {changed}"
        )
    step = int(checkpoint.get("global_step", 0))
    return ResumePoint(path, step, checkpoint.get(EPOCH_ROW))


def changed_settings(before: dict, now: dict) -> str:
    """The model settings that differ between a checkpoint and this run, as 'key old -> new'.
    Settings this module no longer takes (a file from an older version) are not differences."""
    keys = sorted(now)
    return ", ".join(
        f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)
    )
