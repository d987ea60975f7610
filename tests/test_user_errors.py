"""User mistakes: one line naming the problem and its fix, exit code 2, no traceback, nothing left
behind. End to end through scripts/pretrain.py (a subprocess per case: several seconds of imports
each, so only one per kind of mistake), the rest in-process on check_pretrain / load_dataset.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

from moco.data import folder, load_dataset
from moco.data.folder import FolderImages, TooManyUndecodableImages, UndecodableImageWarning
from moco.errors import ConfigError, DataError
from moco.run.check import check_pretrain

REPO = Path(__file__).resolve().parents[1]
# Small enough that any run which wrongly gets past the check ends quickly instead of training.
FAST = ["data.batch_size=16", "model.bn_splits=2", "trainer.max_steps=1", "eval.enabled=false"]


# ------------------------------------------------------------------------------------ helpers
def make_image_folder(
    root: Path, counts: dict[str, int], size: int = 16, ext: str = "png"
) -> list[Path]:
    """root/<class>/<i>.<ext>: small random RGB images that every decoder reads."""
    rng = np.random.default_rng(0)
    paths = []
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"{i:03d}.{ext}"
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return path


def run_pretrain(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/pretrain.py run from an empty directory ``cwd``, its run directory inside it."""
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "pretrain.py"), "hydra.run.dir=run", *overrides],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_nothing_written(cwd: Path) -> None:
    left = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    assert left == [], f"a failed start must leave nothing behind, found {left}"


def assert_one_line_error(result: subprocess.CompletedProcess, cwd: Path, *fragments: str) -> str:
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    assert result.returncode == 2, output[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert_nothing_written(cwd)
    return lines[0]


@pytest.fixture(autouse=True)
def no_skip_report_at_exit():
    """Undecodable files met by these tests are not the user's: no report when pytest exits."""
    folder._SKIPPED.clear()
    yield
    gc.collect()  # data sets of the test record their skipped files when collected
    folder._SKIPPED.clear()


def folder_cfg(compose, root, *extra: str):
    return compose(["data=imagefolder", f"data.root='{root}'", *extra]).data


# --------------------------------------------------------------------- end to end, exit code 2
def _missing_root(tmp: Path) -> list[str]:
    return ["data=imagefolder", f"data.root={tmp / 'nonexistent'}"]


def _empty_root(tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return ["data=imagefolder", f"data.root={tmp / 'empty'}"]


def _empty_fashion_mnist_root(tmp: Path) -> list[str]:
    # system_root and download pinned: the result must not depend on the Debian package or the
    # network of the machine (the search order itself is tested in-process below).
    (tmp / "empty").mkdir()
    return [
        "data=fashion_mnist",
        f"data.root={tmp / 'empty'}",
        f"data.system_root={tmp / 'nowhere'}",
        "data.download=false",
    ]


@pytest.mark.parametrize(
    ("make_overrides", "fragments"),
    [
        (_missing_root, ["data.root=", "nonexistent does not exist", "sub-folder"]),
        (_empty_root, ["holds no class folders", "one sub-folder of images per class"]),
        (
            _empty_fashion_mnist_root,
            ["not found", "apt-get install dataset-fashion-mnist", "data.download=true"],
        ),
        (
            lambda tmp: ["data=synthetic", "model.queue_size=8"],
            ["model.queue_size=8 is smaller than the 16 keys", "raise model.queue_size"],
        ),
        (lambda tmp: ["data=synthetic", "model.temperature=-0.5"], ["model.temperature=-0.5"]),
        (lambda tmp: ["data=synthetic", "model.momentum=-0.1"], ["model.momentum=-0.1", "[0, 1)"]),
        (lambda tmp: ["data=synthetic", "model.head=foo"], ["model.head=foo", "mlp"]),
        (lambda tmp: ["data.name=foo"], ["data.name=foo is unknown", "imagefolder"]),
        (lambda tmp: ["+model.tempreature=0.1"], ["model.tempreature is not a key"]),
        (
            lambda tmp: ["data=synthetic", "trainer=ddp", "+trainer.strategy.bucket_cap=5"],
            ["trainer.strategy.bucket_cap is not an argument", "DistributedDataParallel"],
        ),
    ],
    ids=[
        "imagefolder-missing-root",
        "imagefolder-empty-root",
        "fashion_mnist-empty-root",
        "queue-smaller-than-batch",
        "temperature-negative",
        "momentum-negative",
        "unknown-head",
        "unknown-data-name",
        "misspelt-new-key",
        "misspelt-ddp-argument",
    ],
)
def test_user_mistake_is_one_line_exit_2_and_leaves_nothing(tmp_path, make_overrides, fragments):
    # (temperature=0, momentum=1.0 and the queue through a subprocess: test_pretrain_script.py)
    cwd = tmp_path / "cwd"
    result = run_pretrain(cwd, *FAST, *make_overrides(tmp_path))
    assert_one_line_error(result, cwd, *fragments)


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("augment=v9", ["augment=v9 is unknown", "v1, v2"]),  # unknown option of a group
        ("foo=1", ["foo is not a key", "+foo"]),  # unknown key without + (+foo=1 adds it)
        ("model.temperature=[", ["cannot parse the override", "model.temperature=["]),
        ("augment=null", ["Config group override must be", "one of its options"]),  # group: null
        # A tracker's setting without the tracker: its node is null.
        ("logger.wandb.project=x", ["wandb tracker, which is not chosen", "logger=[csv,wandb]"]),
    ],
)
def test_hydra_command_line_errors_are_one_line_too(tmp_path, override, fragments):
    """Hydra rejects these itself, before our code runs; moco.run.cli.run_hydra_main turns its
    several-line report into our one line, exit code 2, no run directory."""
    cwd = tmp_path / "cwd"
    assert_one_line_error(run_pretrain(cwd, override), cwd, *fragments)


# ---------------------------------------------------------- end to end, an undecodable image
@pytest.mark.slow  # a real (tiny) training run: ~30 s on a busy 2-core machine
def test_undecodable_image_is_skipped_with_a_warning_and_a_count(tmp_path):
    """One garbage .png among good images: the run trains, names the file, and counts it."""
    root = tmp_path / "images"
    make_image_folder(root, {"a": 8, "b": 8})
    bad = write_garbage(root / "a" / "004_bad.png")
    cwd = tmp_path / "cwd"
    result = run_pretrain(
        cwd,
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=16",
        "data.num_classes=2",
        "data.batch_size=4",
        "data.num_workers=1",
        "model.bn_splits=2",
        "model.queue_size=16",
        "trainer.max_epochs=1",
        "eval.enabled=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (cwd / "run" / "checkpoints" / "last.ckpt").is_file()
    warned = [line for line in result.stderr.splitlines() if "UndecodableImageWarning" in line]
    assert len(warned) == 1 and str(bad) in warned[0], result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"warning: 1 of 17 images in {root} could not be decoded and were skipped: {bad}"
    )


# ------------------------------------------------------------- in-process: check_pretrain
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.temperature=abc", "model.temperature='abc' must be a number"),
        ("optimizer.lr=true", "optimizer.lr=true must be a number"),
        ("data.batch_size=16.5", "data.batch_size=16.5 must be a whole number"),
        ("model.queue_size=null", "model.queue_size=null must be a whole number"),
        ("trainer.max_epochs=ten", "trainer.max_epochs='ten' must be a whole number"),
        ("model.symmetric=maybe", "model.symmetric='maybe' must be true or false"),
        ("model.dim=${nope}", "model.dim: Interpolation key 'nope' not found: fix or remove"),
        # In-process the typed config holds 0.0; the scripts echo what the user typed (0).
        ("model.temperature=0", "model.temperature=0.0 must be > 0"),
        ("model.momentum=1.0", "model.momentum=1.0 must be in [0, 1)"),
        ("model.neighbour_weight=1.5", "model.neighbour_weight=1.5 must be in [0, 1]"),
    ],
)
def test_wrong_types_and_broken_references_are_config_errors(default_with, override, message):
    """Before these checks a wrong type ended in a TypeError traceback (exit 1, run dir left)."""
    with pytest.raises(ConfigError) as info:
        check_pretrain(default_with(override))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_null_max_epochs_is_still_a_valid_type(default_with):
    check_pretrain(default_with("trainer.max_epochs=null", "trainer.max_steps=10"))


# ------------------------------------------------------------------ in-process: image folders
def test_imagefolder_root_that_is_a_file(compose, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(folder_cfg(compose, tmp_path / "file.txt"), "pretrain")


def test_imagefolder_class_folders_without_images(compose, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="hold no image files") as info:
        load_dataset(folder_cfg(compose, tmp_path), "pretrain")
    assert "\n" not in str(info.value)


def test_imagefolder_train_without_val_is_an_error_not_a_one_class_test_set(compose, tmp_path):
    make_image_folder(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="no val/ or test/"):
        load_dataset(folder_cfg(compose, tmp_path), "test")


def test_imagefolder_more_classes_than_num_classes(compose, tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match=r"3 class folders but data.num_classes=2.*=3"):
        load_dataset(folder_cfg(compose, tmp_path, "data.num_classes=2"), "pretrain")


def test_imagefolder_val_labels_follow_the_training_class_names(compose, tmp_path):
    make_image_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_image_folder(tmp_path / "val", {"c": 2})  # only class c: label 2, not 0
    cfg = folder_cfg(compose, tmp_path)
    assert [label for _, label in load_dataset(cfg, "test").samples] == [2, 2]
    make_image_folder(tmp_path / "val", {"d": 1})
    with pytest.raises(DataError, match=r"class folders that .* lacks \(d\)"):
        load_dataset(cfg, "test")


@pytest.mark.parametrize("ext", ["bmp", "tiff", "ppm"])
def test_formats_listed_by_imagefolder_but_not_decoded_by_torchvision_io(compose, tmp_path, ext):
    """ImageFolder lists them; torchvision.io cannot decode them; PIL does."""
    make_image_folder(tmp_path, {"a": 2}, size=12, ext=ext)
    for channels, shape in ((3, (3, 12, 12)), (1, (1, 12, 12))):
        ds = load_dataset(folder_cfg(compose, tmp_path, f"data.channels={channels}"), "train")
        image, label = ds[1]
        assert image.shape == shape and image.dtype == torch.uint8 and label == 0
        assert ds.skipped_files() == []


def test_folder_of_non_images_fails_at_load_time(compose, tmp_path):
    """A broken copy (here: every file garbage) fails before any training, in one line."""
    for i in range(20):
        write_garbage(tmp_path / "a" / f"{i}.jpg")
    with pytest.raises(DataError, match=r"16 of 16 files sampled .* cannot be decoded") as info:
        load_dataset(folder_cfg(compose, tmp_path), "pretrain")
    assert "\n" not in str(info.value)


def test_undecodable_file_is_replaced_warned_once_and_counted(compose, tmp_path):
    make_image_folder(tmp_path, {"a": 3, "b": 3})
    bad = write_garbage(tmp_path / "a" / "000_bad.png")  # index 1, between good images
    ds = FolderImages(torchvision.datasets.ImageFolder(str(tmp_path)), channels=3)
    with pytest.warns(UndecodableImageWarning, match=rf"skipped {bad}: .*1 of 7 images"):
        image, label = ds[1]
    assert torch.equal(image, ds[2][0]) and label == 0  # the next good image, with its label
    with warnings.catch_warnings():  # known bad: neither decoded nor reported again
        warnings.simplefilter("error", UndecodableImageWarning)
        assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))
    assert ds.skipped_files() == [str(bad)]
    assert folder.skipped_summaries() == [
        f"warning: 1 of 7 images in {tmp_path} could not be decoded and were skipped: {bad}"
    ]


def test_undecodable_file_met_in_a_worker_is_known_to_the_main_process(tmp_path):
    make_image_folder(tmp_path, {"a": 6, "b": 6})
    bad = write_garbage(tmp_path / "b" / "002_bad.png")
    ds = FolderImages(torchvision.datasets.ImageFolder(str(tmp_path)), channels=3)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert [len(labels) for _, labels in batches] == [4, 4, 4, 1]  # sizes unchanged
    assert ds.skipped_files() == [str(bad)]  # found by a worker, seen here: shared memory
    assert len(folder.skipped_summaries()) == 1


def test_too_many_undecodable_files_stop_with_one_line_even_from_a_worker(tmp_path):
    make_image_folder(tmp_path, {"a": 12})
    for i in range(11):  # more than the floor of 10 bad files
        write_garbage(tmp_path / "b" / f"{i}.png")
    ds = FolderImages(torchvision.datasets.ImageFolder(str(tmp_path)), channels=3)
    with pytest.raises(TooManyUndecodableImages) as info:
        list(DataLoader(ds, batch_size=23, num_workers=1))
    message = str(info.value)
    assert message.startswith(f"11 of 23 images in {tmp_path} cannot be decoded"), message
    assert "\n" not in message and "Traceback" not in message


# ----------------------------------------------------------- in-process: Fashion-MNIST search
class FakeFashionMNIST:
    """Stands in for torchvision's downloader: records the call, then fails or succeeds."""

    calls: list = []
    fail = True

    def __init__(self, root, train, download):
        FakeFashionMNIST.calls.append((Path(root), train, download))
        if FakeFashionMNIST.fail:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
        self.data = torch.zeros(3, 28, 28, dtype=torch.uint8)
        self.targets = torch.tensor([0, 1, 2])


@pytest.fixture
def fake_download(monkeypatch):
    FakeFashionMNIST.calls, FakeFashionMNIST.fail = [], True
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    return FakeFashionMNIST


def fmnist(compose, root, system_root, download):
    return compose(
        [f"data.root='{root}'", f"data.system_root='{system_root}'", f"data.download={download}"]
    ).data


def test_fashion_mnist_system_root_comes_before_a_download(compose, tmp_path, fake_download):
    from test_data import write_fashion_mnist

    write_fashion_mnist(tmp_path / "sys", n_train=5)
    (tmp_path / "root").mkdir()
    ds = load_dataset(fmnist(compose, tmp_path / "root", tmp_path / "sys", "true"), "train")
    assert len(ds) == 5 and fake_download.calls == []


def test_fashion_mnist_downloads_into_root_last(compose, tmp_path, fake_download):
    fake_download.fail = False
    cfg = fmnist(compose, tmp_path / "root", tmp_path / "nowhere", "true")
    assert len(load_dataset(cfg, "test")) == 3
    assert fake_download.calls == [(tmp_path / "root", False, True)]


def test_fashion_mnist_failed_download_names_both_other_ways(compose, tmp_path, fake_download):
    cfg = fmnist(compose, tmp_path / "root", tmp_path / "nowhere", "true")
    with pytest.raises(DataError) as info:
        load_dataset(cfg, "train")
    message = str(info.value)
    assert "\n" not in message and len(fake_download.calls) == 1
    assert f"not found in {tmp_path / 'root'}, {tmp_path / 'nowhere'}" in message
    assert "download into data.root failed (RuntimeError)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "idx .gz files in data.root" in message


def test_fashion_mnist_without_download_names_the_package_and_the_switch(
    compose, tmp_path, fake_download
):
    cfg = fmnist(compose, tmp_path / "root", tmp_path / "nowhere", "false")
    with pytest.raises(DataError) as info:
        load_dataset(cfg, "train")
    message = str(info.value)
    assert fake_download.calls == [] and "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "set data.download=true" in message


def test_failed_start_removes_the_run_directory_and_parents_it_alone_needed(tmp_path, monkeypatch):
    from moco.run.cli import _remove_if_only_hydra_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "other").mkdir(parents=True)  # another data set's runs: kept
    run_dir = tmp_path / "runs" / "synthetic" / "2026-01-01_00-00-00"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "pretrain.log").write_text("")
    _remove_if_only_hydra_files(run_dir)
    assert not (tmp_path / "runs" / "synthetic").exists()
    assert (tmp_path / "runs" / "other").is_dir()

    kept = tmp_path / "runs" / "other" / "run"
    (kept / "checkpoints").mkdir(parents=True)  # real outputs: never removed
    _remove_if_only_hydra_files(kept)
    assert (kept / "checkpoints").is_dir()
