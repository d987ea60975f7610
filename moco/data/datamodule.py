"""LightningDataModule serving pairs of augmented views for pretraining."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from moco.data.augment import TwoViews, pretrain_transform, view_recipes
from moco.data.batch_augment import BatchAugment, pretrain_views
from moco.data.datasets import TensorImages, load_dataset
from moco.data.sampler import EpochSampler, SeededSamples
from moco.data.workers import loader_workers
from moco.errors import ConfigError


class PretrainDataModule(pl.LightningDataModule):
    """Batches of ``((view_q, view_k, *small_crops), labels)`` from the pretraining split of
    ``data_cfg`` (``augment.small_crops.count`` small crops, none by default).

    Two ways to make the views (``augment.batched``): per image with torchvision in the loader
    workers, or for the whole batch at once on the training device (moco/data/batch_augment.py),
    where the loader only hands over uint8 images. ``auto`` takes the batched way whenever the
    images are in memory and already of ``data.image_size`` px.

    Its position in the epoch travels in every checkpoint (``state_dict``): a run resumed from a
    checkpoint written part-way through an epoch goes on with that epoch's next batch.
    """

    def __init__(self, data_cfg, augment_cfg, seed: int = 0) -> None:
        super().__init__()
        self.data_cfg, self.augment_cfg, self.seed = data_cfg, augment_cfg, seed
        self.dataset = None
        self.batch_views: tuple[BatchAugment, ...] | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = load_dataset(self.data_cfg, "pretrain")
        if self._batched():
            self.batch_views = pretrain_views(self.augment_cfg, self.data_cfg)
        else:
            first, second = view_recipes(self.augment_cfg)
            self.dataset.transform = TwoViews(
                pretrain_transform(first, self.data_cfg), pretrain_transform(second, self.data_cfg)
            )

    def _batched(self) -> bool:
        choice = self.augment_cfg.get("batched", "auto")
        size = self.data_cfg.image_size
        same_size = isinstance(self.dataset, TensorImages) and tuple(
            self.dataset.images.shape[-2:]
        ) == (size, size)
        small_crops = self.augment_cfg.small_crops.count
        if small_crops and not (choice in ("auto", True) and same_size):
            raise ConfigError(
                f"augment.small_crops.count={small_crops} needs the batched views: in-memory "
                f"images of data.image_size={size} px and augment.batched=auto or true"
            )
        if choice == "auto":
            return same_size
        if choice and not same_size:
            raise ConfigError(
                f"augment.batched=true needs in-memory images of data.image_size={size} px; "
                f"data={self.data_cfg.name} has others: set augment.batched=auto or false"
            )
        return bool(choice)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.batch_views is None:  # the workers made the views
            return batch
        images, labels = batch
        rank, world = self._rank_and_world()
        return tuple(view.view(images, rank, world) for view in self.batch_views), labels

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = EpochSampler(len(self.dataset), self.seed, rank, world)
        batch_size = self.data_cfg.batch_size
        if self.trainer is not None:  # a checkpoint without a position: at the epoch's start
            sampler.set_epoch(self.trainer.current_epoch)
        if self._resume_at is not None:
            epoch, batches_done = self._resume_at
            if batches_done >= len(sampler) // batch_size:  # written at the end of the epoch
                epoch, batches_done = epoch + 1, 0
            sampler.start_at(epoch, batches_done * batch_size)
            self._resume_at = None
        return DataLoader(
            SeededSamples(self.dataset),
            batch_size=batch_size,
            sampler=sampler,
            # Full batches only, as the official implementation: BatchNorm (and SplitBatchNorm
            # with several splits) is unreliable on a handful of samples. The queue itself
            # accepts any batch size.
            drop_last=True,
            # The workers' own seeds come from this generator, not from the training process's,
            # whose draws must not depend on when a loader starts (moco/data/sampler.py).
            generator=torch.Generator().manual_seed(self.seed),
            # Its worker_init_fn also stands in for Lightning's worker seeding: the draws come
            # from SeededSamples, so workers kept from one epoch to the next carry no generator
            # state a resumed run would lack.
            **loader_workers(self.data_cfg.num_workers, keep=True),
            pin_memory=torch.cuda.is_available(),
        )

    # The position in the epoch, saved in and restored from checkpoints by Lightning.
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:  # checkpoints written before the position was saved have none
            self._resume_at = (int(state_dict["epoch"]), int(state_dict["batches_done"]))
