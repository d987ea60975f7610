"""Data sets as uint8 image tensors (C x H x W) with integer labels, one loader per source.

Splits: ``pretrain`` (images for self-supervised training; STL-10 uses its unlabeled split),
``train`` (labelled training images, the kNN bank and the probe's training set) and ``test``.
"""

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
import torchvision.transforms.v2.functional
from torch.utils.data import Dataset

from moco.data.folder import FolderImages
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
    # Looked in data.root, then in data.system_root; the last resort is a download into data.root.
    looked = ", ".join(str(p) for p in places) or "nowhere (data.root and data.system_root unset)"
    debian = "install the Debian package (apt-get install dataset-fashion-mnist)"
    if cfg.download and cfg.root:
        try:
            ds = torchvision.datasets.FashionMNIST(
                _expand(cfg.root), train=split != "test", download=True
            )
            return TensorImages(ds.data.unsqueeze(1), ds.targets.long())
        except Exception as exc:  # no network, proxy, disk full: all end in the same advice
            raise DataError(
                f"Fashion-MNIST not found in {looked} and its download into data.root failed "
                f"({type(exc).__name__}): {debian}, or put the four idx .gz files in data.root "
                "and run again"
            ) from None
    download = (
        "set data.download=true to download it into data.root"
        if cfg.root
        else "set data.root=/some/folder data.download=true to download it there"
    )
    raise DataError(
        f"Fashion-MNIST not found in {looked}: {debian}, or {download}, "
        "or put the four idx .gz files in data.root"
    )


# ------------------------------------------------------------------------ other real data sets
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


_FOLDER_LAYOUT = "one sub-folder of images per class (optionally under train/ and val/)"


def _class_folders(folder: Path) -> list[str]:
    try:
        return torchvision.datasets.folder.find_classes(folder)[0]
    except FileNotFoundError:
        raise DataError(
            f"{folder} holds no class folders: data.root must hold {_FOLDER_LAYOUT}"
        ) from None


def _imagefolder(cfg, split: str) -> FolderImages:
    root = _expand(cfg.root)
    if root is None or not root.exists():
        raise DataError(
            f"data.root={cfg.root} does not exist: set data.root to a folder with {_FOLDER_LAYOUT}"
        )
    if not root.is_dir():
        raise DataError(
            f"data.root={cfg.root} is a file: it must be a folder with {_FOLDER_LAYOUT}"
        )
    # root/train and root/test (or root/val) when present; otherwise root itself for every split.
    train = root / "train" if (root / "train").is_dir() else root
    test = next((root / c for c in ("test", "val") if (root / c).is_dir()), None)
    if test is None and train != root:
        # Else root itself would be the test set, with train/ as its one class.
        raise DataError(
            f"{root} has a train/ folder but no val/ or test/ folder for the kNN bank and the "
            "linear probe: add one, or move the class folders up into data.root"
        )
    folder = test if split == "test" and test is not None else train
    classes = _class_folders(train)  # the labels of every split: indices into these
    if len(classes) > cfg.num_classes:
        # Labels >= num_classes would crash the kNN monitor at the end of the first epoch.
        raise DataError(
            f"{train} has {len(classes)} class folders but data.num_classes={cfg.num_classes}: "
            f"set data.num_classes={len(classes)}"
        )
    extra = sorted(set(_class_folders(folder)) - set(classes))
    if extra:
        raise DataError(
            f"{folder} has class folders that {train} lacks ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}): give both the same class folders"
        )
    # allow_empty: an empty class folder is no reason to stop; a folder without images is.
    images = torchvision.datasets.ImageFolder(str(folder), allow_empty=True)
    if not images.samples:
        raise DataError(
            f"the class folders of {folder} hold no image files (.jpg, .png, .webp, .bmp, .tif, "
            f"...): data.root must hold {_FOLDER_LAYOUT}"
        )
    # A test folder may lack some classes: label by class name, as in the training folder.
    label = {name: i for i, name in enumerate(classes)}
    images.samples = [(path, label[images.classes[y]]) for path, y in images.samples]
    dataset = FolderImages(images, cfg.channels)
    dataset.check_sample()
    return dataset


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
