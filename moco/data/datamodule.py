"""LightningDataModule serving pairs of augmented views for pretraining."""

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from moco.data.augment import TwoViews, pretrain_transform
from moco.data.datasets import load_dataset


class PretrainDataModule(pl.LightningDataModule):
    """Batches of ``((view_q, view_k), labels)`` from the pretraining split of ``data_cfg``."""

    def __init__(self, data_cfg, augment_cfg) -> None:
        super().__init__()
        self.data_cfg, self.augment_cfg = data_cfg, augment_cfg
        self.dataset = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = load_dataset(self.data_cfg, "pretrain")
            self.dataset.transform = TwoViews(pretrain_transform(self.augment_cfg, self.data_cfg))

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
