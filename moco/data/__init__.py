"""Data sets, augmentation recipes and the pretraining LightningDataModule."""

from moco.data.datamodule import PretrainDataModule
from moco.data.datasets import load_dataset

__all__ = ["PretrainDataModule", "load_dataset"]
