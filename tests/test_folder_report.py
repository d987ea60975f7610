"""The undecodable images of an image folder are reported once, for every process together.

Each process (rank) reads its own shard of a folder and counts the files it could not decode;
moco.data.folder.all_ranks_skipped_summaries merges them on rank 0 at the end of training
(moco/run/skipped_images.py), so that the exit report of each process does not repeat them.
"""

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from PIL import Image

from moco.data import folder
from moco.data.folder import FolderImages, UndecodableImageWarning
from moco.run.skipped_images import ReportSkippedImages

WORLD = 2


@pytest.fixture(autouse=True)
def no_skip_report_at_exit():
    """Undecodable files met by these tests are not the user's: no report when pytest exits."""
    folder._SKIPPED.clear()
    folder._REPORTED.clear()
    yield
    gc.collect()  # data sets of the test record their skipped files when collected
    folder._SKIPPED.clear()
    folder._REPORTED.clear()


def _image_folder(root: Path) -> tuple[Path, Path]:
    """root/a and root/b with 4 good 8 px PNGs each and one garbage file each; returns the two
    garbage files (sorted order puts a's at index 0 and b's at index 5)."""
    rng = np.random.default_rng(0)
    bad = []
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(1, 5):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png"
            )
        bad.append(root / name / "0_bad.png")
        bad[-1].write_bytes(b"not an image" * 20)
    return bad[0], bad[1]


def _images(root: Path) -> FolderImages:
    return FolderImages(torchvision.datasets.ImageFolder(str(root)), channels=3)


def _read(dataset: FolderImages, indices) -> None:
    with pytest.warns(UndecodableImageWarning):
        for i in indices:
            dataset[i]


def test_one_process_reports_at_the_end_of_training_and_not_again_at_exit(tmp_path, capsys):
    bad_a, _ = _image_folder(tmp_path)
    dataset = _images(tmp_path)
    _read(dataset, [0])
    ReportSkippedImages().on_train_end(None, None)
    assert capsys.readouterr().err.strip().splitlines() == [
        f"warning: 1 of 10 images in {tmp_path} could not be decoded and were skipped: {bad_a}"
    ]
    assert folder.skipped_summaries() == []  # nothing left for the report at exit
    _read(dataset, [5])  # a file met afterwards is still reported at exit
    assert len(folder.skipped_summaries()) == 1 and "1 of 10" in folder.skipped_summaries()[0]


def _under_gloo(rank: int, root: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=WORLD
    )
    try:
        dataset = _images(root)
        # Rank 0 meets a's bad file, rank 1 both bad files: 2 different files in all.
        for i in [0] if rank == 0 else [0, 5]:
            dataset[i]
        result = {"together": folder.all_ranks_skipped_summaries()}
        result["left_at_exit"] = folder.skipped_summaries()
        torch.save(result, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, each importing Lightning
def test_two_processes_report_one_line_with_the_files_of_both_on_rank_0(tmp_path):
    root = tmp_path / "images"
    bad_a, bad_b = _image_folder(root)
    mp.spawn(_under_gloo, args=(root, tmp_path), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[0]["together"] == [
        f"warning: 2 of 10 images in {root} could not be decoded and were skipped: {bad_a}, {bad_b}"
    ]
    assert ranks[1]["together"] == []
    assert [r["left_at_exit"] for r in ranks] == [[], []]  # no per-process line at exit
