"""LightningDataModule serving pairs of augmented views for pretraining."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from moco.data.augment import TwoViews, pretrain_transform
from moco.data.batch_augment import BatchAugment
from moco.data.datasets import TensorImages, load_dataset
from moco.errors import ConfigError


class PretrainDataModule(pl.LightningDataModule):
    """Batches of ``((view_q, view_k), labels)`` from the pretraining split of ``data_cfg``.

    Two ways to make the views (``augment.batched``): per image with torchvision in the loader
    workers, or for the whole batch at once on the training device (moco/data/batch_augment.py),
    where the loader only hands over uint8 images. ``auto`` takes the batched way whenever the
    images are in memory and already of ``data.image_size`` px.
    """

    def __init__(self, data_cfg, augment_cfg) -> None:
        super().__init__()
        self.data_cfg, self.augment_cfg = data_cfg, augment_cfg
        self.dataset = None
        self.batch_augment: BatchAugment | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        self.dataset = load_dataset(self.data_cfg, "pretrain")
        if self._batched():
            self.batch_augment = BatchAugment(self.augment_cfg, self.data_cfg)
        else:
            self.dataset.transform = TwoViews(pretrain_transform(self.augment_cfg, self.data_cfg))

    def _batched(self) -> bool:
        choice = self.augment_cfg.get("batched", "auto")
        size = self.data_cfg.image_size
        same_size = isinstance(self.dataset, TensorImages) and tuple(
            self.dataset.images.shape[-2:]
        ) == (size, size)
        if choice == "auto":
            return same_size
        if choice and not same_size:
            raise ConfigError(
                f"augment.batched=true needs in-memory images of data.image_size={size} px; "
                f"data={self.data_cfg.name} has others: set augment.batched=auto or false"
            )
        return bool(choice)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.batch_augment is None:  # the workers made the views
            return batch
        images, labels = batch
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return self.batch_augment.two_views(images, rank, world), labels

    def train_dataloader(self) -> DataLoader:
        workers = self.data_cfg.num_workers
        return DataLoader(
            self.dataset,
            batch_size=self.data_cfg.batch_size,
            shuffle=True,
            # Full batches only, as the official implementation: BatchNorm (and SplitBatchNorm
            # with several splits) is unreliable on a handful of samples. The queue itself
            # accepts any batch size.
            drop_last=True,
            num_workers=workers,
            # Workers start afresh each epoch, seeded from the main process's generator: a run
            # resumed from a checkpoint then draws the same augmentations as one never stopped
            # (persistent workers would carry generator states no checkpoint holds).
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
