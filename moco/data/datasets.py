"""Data sets as uint8 image tensors (C x H x W) with integer labels, one loader per source.

Splits: ``pretrain`` (images for self-supervised training; STL-10 uses its unlabeled split),
``train`` (labelled training images, the kNN bank and the probe's training set) and ``test``.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch.utils.data import Dataset

from moco.data.idx import read_idx
from moco.data.synthetic import make_synthetic
from moco.errors import ConfigError, DataError

SPLITS = ("pretrain", "train", "test")


class TensorImages(Dataset):
    """In-memory images (N x C x H x W, uint8) and labels (N), with an optional transform."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None
    ):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class FolderImages(Dataset):
    """Images decoded from files on demand (torchvision ImageFolder layout), as uint8 tensors."""

    def __init__(self, folder: torchvision.datasets.ImageFolder, channels: int, transform=None):
        self.samples, self.channels, self.transform = folder.samples, channels, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        mode = (
            torchvision.io.ImageReadMode.RGB
            if self.channels == 3
            else torchvision.io.ImageReadMode.GRAY
        )
        image = torchvision.io.decode_image(path, mode=mode)
        return (self.transform(image) if self.transform else image), label


def _expand(root: str | None) -> Path | None:
    return Path(root).expanduser() if root else None


# ------------------------------------------------------------------------------ Fashion-MNIST
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw"):
        for suffix in (".gz", ""):
            path = directory / sub / (stem + suffix)
            if path.is_file():
                return path
    return None


def _fashion_mnist(cfg, split: str) -> TensorImages:
    image_stem, label_stem = _FMNIST_FILES["test" if split == "test" else "train"]
    places = [p for p in (_expand(cfg.root), _expand(cfg.system_root)) if p is not None]
    for place in places:
        images_path, labels_path = _find_idx(place, image_stem), _find_idx(place, label_stem)
        if images_path and labels_path:
            try:
                images = read_idx(images_path).unsqueeze(1)  # N x 1 x 28 x 28
                labels = read_idx(labels_path).long()
            except ValueError as exc:
                raise DataError(f"{exc}: delete the file and get it again") from None
            return TensorImages(images, labels)
    if cfg.download and cfg.root:
        try:
            ds = torchvision.datasets.FashionMNIST(
                _expand(cfg.root), train=split != "test", download=True
            )
            return TensorImages(ds.data.unsqueeze(1), ds.targets.long())
        except Exception as exc:  # no network, proxy, disk full: all end in the same advice
            reason = f" (download failed: {type(exc).__name__})"
    else:
        reason = ""
    looked = ", ".join(str(p) for p in places) or "nowhere (data.root is unset)"
    raise DataError(
        f"Fashion-MNIST not found in {looked}{reason}: install the Debian package "
        "(apt-get install dataset-fashion-mnist) or put the four idx .gz files in data.root"
    )


# ------------------------------------------------------------------------ other real data sets
def _require_root(cfg) -> Path:
    root = _expand(cfg.root)
    if root is None or not root.exists():
        raise DataError(f"data.root '{cfg.root}' does not exist: set data.root=/path/to/{cfg.name}")
    return root


def _cifar10(cfg, split: str) -> TensorImages:
    try:
        ds = torchvision.datasets.CIFAR10(
            _expand(cfg.root), train=split != "test", download=cfg.download
        )
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found in data.root={cfg.root}: set data.download=true "
            f"or unpack cifar-10-batches-py there ({exc})"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # N x 3 x 32 x 32
    return TensorImages(images, torch.tensor(ds.targets))


def _stl10(cfg, split: str) -> TensorImages:
    stl_split = {"pretrain": "unlabeled", "train": "train", "test": "test"}[split]
    try:
        ds = torchvision.datasets.STL10(_expand(cfg.root), split=stl_split, download=cfg.download)
    except RuntimeError as exc:
        raise DataError(
            f"STL-10 not found in data.root={cfg.root}: set data.download=true "
            f"or unpack stl10_binary there ({exc})"
        ) from None
    return TensorImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long())


def _imagefolder(cfg, split: str) -> FolderImages:
    root = _require_root(cfg)
    # root/train and root/test (or root/val) when present; otherwise root itself for every split.
    candidates = ["test", "val"] if split == "test" else ["train"]
    folder = next((root / c for c in candidates if (root / c).is_dir()), root)
    try:
        images = torchvision.datasets.ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"no images in {folder}: data.root must hold one folder per class ({exc})"
        ) from None
    return FolderImages(images, cfg.channels)


def _synthetic(cfg, split: str) -> TensorImages:
    count = cfg.num_test if split == "test" else cfg.num_train
    seed = cfg.seed + (1 if split == "test" else 0)  # test images differ from training images
    images, labels = make_synthetic(count, cfg.image_size, cfg.channels, cfg.num_classes, seed)
    return TensorImages(images, labels)


LOADERS = {
    "fashion_mnist": _fashion_mnist,
    "cifar10": _cifar10,
    "stl10": _stl10,
    "imagefolder": _imagefolder,
    "synthetic": _synthetic,
}


def load_dataset(cfg, split: str) -> Dataset:
    """The ``split`` of the data set described by the data config ``cfg`` (no transform yet)."""
    if cfg.name not in LOADERS:
        raise ConfigError(f"unknown data set '{cfg.name}': choose one of {sorted(LOADERS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dataset = LOADERS[cfg.name](cfg, split)
    if len(dataset) == 0:
        raise DataError(f"the {split} split of {cfg.name} at data.root={cfg.root} is empty")
    return dataset
