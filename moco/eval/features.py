"""Frozen features: un-augmented images through an encoder in eval mode, without gradients.

``FrozenFeatures`` picks the layer (the backbone output before the projection head, the standard
choice, or the head's embedding; raw pixels when there is no encoder). ``extract_features`` runs a
data set through it in batches (``encode`` runs a loader, which a caller may keep and read
again); ``cached_features`` keeps the result on disk, keyed by everything that determines it, so
the kNN, probe and optimizer-comparison scripts extract a checkpoint's features once.
"""

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from moco.data.augment import eval_transform
from moco.data.datasets import load_dataset
from moco.data.workers import loader_workers
from moco.encoders import Encoder
from moco.errors import ConfigError

LAYERS = ("backbone", "head")


class FrozenFeatures(nn.Module):
    """Images (N x C x H x W) to features (N x D): backbone or head output of an ``Encoder``, or,
    with ``encoder=None``, the normalised pixels flattened (the ``raw`` baseline)."""

    def __init__(self, encoder: Encoder | None, layer: str = "backbone") -> None:
        super().__init__()
        if layer not in LAYERS:
            raise ConfigError(f"features.layer={layer} is unknown: use one of {list(LAYERS)}")
        if encoder is None and layer != "backbone":
            raise ConfigError(
                "raw pixels have no projection head: use features.layer=backbone "
                "with checkpoint=raw"
            )
        if layer == "head" and encoder is not None and encoder.head is None:
            raise ConfigError(
                "the checkpoint holds no MoCo projection head (backbone weights only): use "
                "features.layer=backbone"
            )
        self.encoder, self.layer = encoder, layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return images.flatten(1)  # N x (C*H*W)
        if self.layer == "head":
            return self.encoder(images)  # N x dim
        if self.encoder.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.encoder.backbone(images)  # N x 512 for ResNet-18


def eval_dataset(data_cfg, split: str, limit: int | None = None, seed: int = 0) -> Dataset:
    """The ``split`` with the un-augmented eval transform; a fixed random subset of ``limit``."""
    dataset = load_dataset(data_cfg, split)
    dataset.transform = eval_transform(data_cfg)
    if limit is not None and limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
        dataset = Subset(dataset, order[:limit].sort().values.tolist())
    return dataset


def feature_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, keep_workers: bool = False
) -> DataLoader:
    """``dataset`` in order, in batches; ``keep_workers`` for a loader read again and again (the
    kNN monitor's, every epoch), whose worker processes then start once."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        **loader_workers(num_workers, keep=keep_workers),
    )


def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N x D, float32, CPU) and labels (N) of ``dataset``, in order: see ``encode``."""
    loader = feature_loader(dataset, batch_size, num_workers)
    return encode(model, loader, device, desc, autocast)


# no_grad, not inference_mode: the probe trains on these tensors, autograd must accept them.
@torch.no_grad()
def encode(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N x D, float32, CPU) and labels (N) of the data set ``loader`` reads in order.

    Every sub-module is put in eval mode (BatchNorm uses its running statistics, the data do not
    change them) and given back its own mode afterwards, so this is safe in the middle of
    training. ``desc`` shows a progress bar.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    size = len(loader.dataset)
    features, labels, start = None, torch.empty(size, dtype=torch.long), 0
    try:
        for images, targets in tqdm(
            loader, desc=desc, disable=desc is None, unit="batch", leave=False
        ):
            with autocast():
                batch = model(images.to(device, non_blocking=True)).float().cpu()
            if features is None:  # filled in place: no second copy of a large bank from a cat
                features = torch.empty(size, batch.shape[1])
            features[start : start + len(batch)] = batch
            labels[start : start + len(batch)] = targets
            start += len(batch)
    finally:
        for module, mode in modes:
            module.train(mode)
    if features is None:  # an empty data set (e.g. a DDP shard of a tiny bank)
        features = torch.empty(0, 0)
    return features, labels


def cache_key(source: str, layer: str, data_cfg, split: str, limit: int | None) -> str:
    """A digest of everything the features depend on (``source`` identifies the weights)."""
    data = OmegaConf.to_container(data_cfg, resolve=True)
    for irrelevant in ("batch_size", "num_workers", "download"):  # do not change the features
        data.pop(irrelevant, None)
    parts = {
        "source": source,
        "layer": layer,
        "split": split,
        "limit": limit,
        "torch": torch.__version__,
        "data": data,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_features(
    cache_dir: str | None, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``compute()``, or its earlier result stored as ``cache_dir/key.pt``; no cache if None."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["features"], saved["labels"]
    features, labels = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save({"features": features, "labels": labels}, partial)
    partial.replace(path)  # atomic: an interrupted run leaves no truncated cache entry
    return features, labels
