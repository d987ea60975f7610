"""Data: synthetic images, the idx reader, the Fashion-MNIST loader, augmentations, DataModule."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.transforms import v2

from moco.data import PretrainDataModule, load_dataset
from moco.data.augment import TwoViews, pretrain_transform
from moco.data.idx import read_idx
from moco.data.synthetic import make_synthetic
from moco.errors import DataError
from moco.run.schema import ViewConfig

FMNIST_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_per_seed():
    a_images, a_labels = make_synthetic(30, 8, 3, 10, seed=5)
    b_images, b_labels = make_synthetic(30, 8, 3, 10, seed=5)
    c_images, _ = make_synthetic(30, 8, 3, 10, seed=6)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    assert not torch.equal(a_images, c_images)
    # Not a single image in common between the two seeds.
    assert (a_images.flatten(1) != c_images.flatten(1)).any(dim=1).all()


def test_synthetic_shapes_dtype_and_balanced_labels():
    images, labels = make_synthetic(40, 12, 1, 4, seed=0)
    assert images.shape == (40, 1, 12, 12) and images.dtype == torch.uint8
    assert labels.shape == (40,)
    assert torch.bincount(labels).tolist() == [10, 10, 10, 10]
    assert int(images.min()) < 40 and int(images.max()) > 215  # uses the uint8 range


def test_synthetic_rejects_too_many_classes():
    with pytest.raises(ValueError):
        make_synthetic(10, 8, 1, 11, seed=0)


def test_synthetic_classes_are_separable_but_images_are_not_copies():
    train, train_labels = make_synthetic(300, 16, 3, 10, seed=0)
    test, test_labels = make_synthetic(100, 16, 3, 10, seed=1)

    def features(x: torch.Tensor) -> torch.Tensor:  # centred, unit-norm raw pixels
        flat = x.float().flatten(1)
        return F.normalize(flat - flat.mean(1, keepdim=True), dim=1)

    nearest = (features(test) @ features(train).T).argmax(dim=1)
    accuracy = (train_labels[nearest] == test_labels).float().mean().item()
    assert accuracy > 0.5, f"1-NN accuracy {accuracy} is close to chance (0.1)"

    # No two images are equal, and within a class the images vary a lot.
    flat = train.flatten(1).float()
    distances = torch.cdist(flat, flat)
    distances.fill_diagonal_(float("inf"))
    assert distances.min() > 100  # L2 in uint8 units over 768 values
    for c in range(10):
        members = train[train_labels == c].float()
        assert members.std(dim=0).mean() > 10, f"class {c} is nearly constant"


def test_synthetic_through_load_dataset_splits_differ(tiny_cfg):
    cfg = tiny_cfg().data
    train = load_dataset(cfg, "train")
    pretrain = load_dataset(cfg, "pretrain")
    test = load_dataset(cfg, "test")
    assert len(train) == cfg.num_train and len(test) == cfg.num_test
    assert torch.equal(train.images, pretrain.images)
    assert not torch.equal(train.images[: len(test)], test.images)
    image, label = train[3]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 3
    with pytest.raises(ValueError):
        load_dataset(cfg, "validation")


# ------------------------------------------------------------------------------ idx files
_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding written out from the specification: 0, 0, type, ndim, big-endian dims."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = bytes([0, 0, _TYPE_CODES[big.dtype], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + big.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_uint8_images(tmp_path, name):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 7, 6), dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, images))
    assert out.dtype == torch.uint8 and out.shape == (5, 7, 6)
    assert torch.equal(out, torch.from_numpy(images))


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_read_idx_uint8_labels(tmp_path, name):
    labels = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    out = read_idx(write_idx(tmp_path / name, labels))
    assert out.tolist() == [9, 0, 3, 3, 7]


@pytest.mark.parametrize(
    "dtype,torch_dtype",
    [(">i4", torch.int32), (">f4", torch.float32), (">i2", torch.int16), (np.int8, torch.int8)],
)
def test_read_idx_big_endian_types_come_back_in_native_order(tmp_path, dtype, torch_dtype):
    values = np.array([[1, -2, 300], [40000 if dtype == ">i4" else 4, 5, -6]]).astype(dtype)
    out = read_idx(write_idx(tmp_path / "values.idx", values))
    assert out.dtype == torch_dtype
    assert out.tolist() == values.astype(values.dtype.newbyteorder("=")).tolist()


def test_read_idx_truncated_data_raises_value_error(tmp_path):
    raw = idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)
    gz = tmp_path / "short-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(gz)


def test_read_idx_truncated_header_raises_value_error(tmp_path):
    path = tmp_path / "header-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))[:10])
    with pytest.raises(ValueError):
        read_idx(path)


def test_read_idx_truncated_gzip_stream_raises_value_error(tmp_path):
    compressed = gzip.compress(idx_bytes(np.zeros((40, 28, 28), dtype=np.uint8)))
    path = tmp_path / "cut-idx3-ubyte.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x01\x00\x08\x01", b"\x00\x00\x07\x01", b"PK\x03\x04"])
def test_read_idx_bad_magic_raises(tmp_path, magic):
    raw = idx_bytes(np.zeros(3, dtype=np.uint8))
    path = tmp_path / "bad"
    path.write_bytes(magic + raw[4:])
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)


# --------------------------------------------------------------------------- Fashion-MNIST
def write_fashion_mnist(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    suffix = ".gz" if gz else ""
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / (stem + suffix), array)
    return arrays


def fmnist_cfg(compose, root, system_root, download=False):
    return compose(
        [
            f"data.root='{root}'",
            f"data.system_root='{system_root}'",
            f"data.download={str(download).lower()}",
        ]
    ).data


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files_from_root(compose, tmp_path, gz):
    arrays = write_fashion_mnist(tmp_path / "fm", gz=gz)
    cfg = fmnist_cfg(compose, tmp_path / "fm", tmp_path / "missing")
    for split, prefix in (("train", "train"), ("pretrain", "train"), ("test", "t10k")):
        ds = load_dataset(cfg, split)
        images = torch.from_numpy(arrays[f"{prefix}-images-idx3-ubyte"]).unsqueeze(1)
        labels = torch.from_numpy(arrays[f"{prefix}-labels-idx1-ubyte"]).long()
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images, images)
        assert torch.equal(ds.labels, labels)
        image, label = ds[1]
        assert torch.equal(image, images[1]) and label == int(labels[1])


def test_fashion_mnist_torchvision_layout_and_system_root_fallback(compose, tmp_path):
    arrays = write_fashion_mnist(tmp_path / "sys" / "FashionMNIST" / "raw", n_train=3)
    (tmp_path / "empty").mkdir()
    cfg = fmnist_cfg(compose, tmp_path / "empty", tmp_path / "sys")
    ds = load_dataset(cfg, "train")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


def test_fashion_mnist_root_wins_over_system_root(compose, tmp_path):
    write_fashion_mnist(tmp_path / "root", n_train=2)
    write_fashion_mnist(tmp_path / "sys", n_train=5)
    ds = load_dataset(fmnist_cfg(compose, tmp_path / "root", tmp_path / "sys"), "train")
    assert len(ds) == 2


def test_fashion_mnist_missing_raises_data_error_with_the_fix(compose, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = fmnist_cfg(compose, tmp_path / "empty", tmp_path / "no-such-dir")
    with pytest.raises(DataError) as info:
        load_dataset(cfg, "train")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.root" in message
    assert str(tmp_path / "empty") in message
    assert "\n" not in message


def test_fashion_mnist_corrupt_file_raises_data_error(compose, tmp_path):
    write_fashion_mnist(tmp_path / "fm")
    path = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError):
        load_dataset(fmnist_cfg(compose, tmp_path / "fm", tmp_path / "missing"), "train")


@pytest.mark.skipif(
    not (FMNIST_SYSTEM / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_test_split(compose, tmp_path):
    cfg = fmnist_cfg(compose, tmp_path, FMNIST_SYSTEM)
    ds = load_dataset(cfg, "test")
    assert len(ds) == 10000
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.min() == 0 and ds.labels.max() == 9
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    # The documented mean of the data config is the real pixel mean (to ~0.01).
    assert abs(ds.images.float().mean().item() / 255 - cfg.mean[0]) < 0.01


# ------------------------------------------------------------------------------ augmentations
def flat_ops(transform) -> list:
    """Every transform inside Compose / RandomApply, depth first."""
    out = []
    for op in getattr(transform, "transforms", []):
        out.append(op)
        out.extend(flat_ops(op))
    return out


def find(ops, kind):
    return [op for op in ops if isinstance(op, kind)]


def test_grey_28px_v2_has_no_blur_and_no_colour_ops(compose):
    cfg = compose()  # MoCo v2's own crops (the group defaults, no data-set recipe)
    assert cfg.data.channels == 1 and cfg.data.image_size == 28
    ops = flat_ops(pretrain_transform(cfg.augment, cfg.data))
    assert not find(ops, v2.GaussianBlur)
    assert not find(ops, v2.RandomGrayscale) and not find(ops, v2.Grayscale)
    jitters = find(ops, v2.ColorJitter)
    assert len(jitters) == 1
    assert jitters[0].saturation is None and jitters[0].hue is None
    assert jitters[0].brightness == pytest.approx((0.6, 1.4))
    assert jitters[0].contrast == pytest.approx((0.6, 1.4))
    crop = find(ops, v2.RandomResizedCrop)[0]
    assert list(crop.size) == [28, 28] and crop.scale == pytest.approx((0.2, 1.0))
    assert find(ops, v2.RandomHorizontalFlip)[0].p == 0.5
    norm = find(ops, v2.Normalize)[0]
    assert norm.mean == pytest.approx([0.2860]) and norm.std == pytest.approx([0.3530])


def test_rgb_96px_v2_has_blur_grayscale_and_jitter_with_hue(compose):
    cfg = compose(["data=stl10"])
    assert cfg.data.channels == 3 and cfg.data.image_size == 96
    ops = flat_ops(pretrain_transform(cfg.augment, cfg.data))
    blur = find(ops, v2.GaussianBlur)
    assert len(blur) == 1 and blur[0].sigma == pytest.approx([0.1, 2.0])
    assert blur[0].kernel_size[0] % 2 == 1 and 5 <= blur[0].kernel_size[0] <= 11  # ~10% of 96
    assert find(ops, v2.RandomGrayscale)[0].p == pytest.approx(0.2)
    jitter = find(ops, v2.ColorJitter)[0]
    assert jitter.hue == pytest.approx((-0.1, 0.1))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    applies = {type(op.transforms[0]): op.p for op in find(ops, v2.RandomApply)}
    assert applies[v2.ColorJitter] == pytest.approx(0.8)
    assert applies[v2.GaussianBlur] == pytest.approx(0.5)


def test_two_views_are_different_float_crops_of_the_same_image(compose):
    cfg = compose(["data=synthetic", "data.image_size=16"])
    images, _ = make_synthetic(2, 16, 3, 2, seed=0)
    views = TwoViews(pretrain_transform(cfg.augment, cfg.data))
    torch.manual_seed(0)
    first, second = views(images[0])
    for view in (first, second):
        assert view.shape == (3, 16, 16) and view.dtype == torch.float32
    assert not torch.allclose(first, second)
    # Normalised with the data config's mean/std: values are centred, not in [0, 255] or [0, 1].
    assert first.min() < 0 < first.max()
    # Same image, same seed -> the same pair: the randomness is torch's.
    torch.manual_seed(0)
    again = views(images[0])
    assert torch.equal(again[0], first) and torch.equal(again[1], second)


def test_pretrain_datamodule_yields_pairs_of_views_with_drop_last(tiny_cfg):
    # 20 images, batch 8: two full batches, 4 dropped. Views made per image in the workers
    # (the batched way is in tests/test_batch_augment.py).
    cfg = tiny_cfg("data.num_train=20", "augment.batched=false")
    dm = PretrainDataModule(cfg.data, cfg.augment)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.drop_last
    batches = list(loader)
    assert len(batches) == 2
    for (view_q, view_k), labels in batches:
        assert view_q.shape == view_k.shape == (8, 3, 8, 8)
        assert view_q.dtype == torch.float32
        assert labels.shape == (8,) and labels.dtype == torch.long
        assert not torch.allclose(view_q, view_k)


def test_augmentation_without_jitter_needs_no_jitter_strengths(compose):
    # The linear probe's augmentation (conf/probe/, typed by ViewConfig) says only
    # color_jitter: {p: 0}.
    cfg = compose(["data=stl10"])
    plain = OmegaConf.merge(
        ViewConfig,
        {
            "crop_scale": [0.08, 1.0],
            "color_jitter": {"p": 0.0},
            "grayscale_p": 0.0,
            "blur": {"p": 0.0},
            "flip_p": 0.5,
        },
    )
    ops = flat_ops(pretrain_transform(plain, cfg.data))
    assert not find(ops, v2.ColorJitter) and not find(ops, v2.RandomGrayscale)
    assert [type(op) for op in ops[:2]] == [v2.RandomResizedCrop, v2.RandomHorizontalFlip]
