"""Image folders read lazily, file by file, that survive the odd undecodable image.

A bad file is skipped with a warning (and counted at the end) rather than ending the run: decoding
happens in data-loader workers, so a truncated JPEG would otherwise surface hours into an
ImageNet epoch. Too many bad files, or a folder of non-images, still stop with one line.
"""

import atexit
import os
import sys
import warnings
import weakref

import torch
import torchvision
import torchvision.transforms.v2.functional
from torch.utils.data import Dataset

from moco.distributed import gather_objects, rank
from moco.errors import DataError


class UndecodableImageWarning(UserWarning):
    """An image file of an image folder could not be decoded and was skipped."""


class TooManyUndecodableImages(DataError):
    """Raised, possibly inside a data-loader worker, when too many files cannot be decoded.

    torch re-raises a worker's exception in the main process as ``type(exc)(message)``, where the
    message is the worker's whole traceback; only its last line (the original message) is kept,
    so the user still reads one line.
    """

    def __init__(self, message: str) -> None:
        if "\nOriginal Traceback" in message:  # rebuilt by torch.utils.data's ExceptionWrapper
            last = message.rstrip().splitlines()[-1]  # "moco.data.datasets.TooMany...: <message>"
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


# Undecodable images: skip with a warning, do not stop. Decoding is lazy (in the data-loader
# workers, one file at a time), and opening all 1.28M ImageNet files at setup would take longer
# than an epoch, so a bad file is only met mid-training; dying hours into a run because of one
# truncated JPEG loses the run. So a file that cannot be decoded is replaced by the next good
# image (the batch keeps its size, which SplitBatchNorm needs), with a warning naming the file
# (once: bad files are remembered in memory shared with the workers) and a count at exit. Two
# guards keep the skipping honest, so that a broken copy of the data is not trained on silently:
# a small sample is decoded when the folder is loaded (a folder of non-images fails at once,
# before any training), and more than _MAX_BAD_FRACTION bad files (at least _MIN_BAD_LIMIT)
# stop the run with an error.
_MAX_BAD_FRACTION = 0.01
_MIN_BAD_LIMIT = 10
_SAMPLE_SIZE = 16
# The count at the end: live image folders, and the bad files of those already garbage-collected
# (the data module may be gone by then), per folder: root -> (images, bad files). A pretraining
# run reports them once for all its processes when training ends (all_ranks_skipped_summaries);
# whatever is left unreported, after an error or in a script without that report, is reported
# by each process at exit (_report_skipped), when the other processes can no longer be asked.
_LIVE_FOLDERS: "weakref.WeakSet[FolderImages]" = weakref.WeakSet()
_SKIPPED: dict[str, tuple[int, set[str]]] = {}
_REPORTED: dict[str, set[str]] = {}  # root -> bad files already in a report


def _decode_file(path: str, channels: int) -> torch.Tensor:
    """C x H x W uint8. torchvision.io reads JPEG/PNG/WebP/GIF; PIL reads the other formats
    ImageFolder lists (BMP, TIFF, PPM/PGM). Raises OSError/RuntimeError when neither can."""
    mode = torchvision.io.ImageReadMode.RGB if channels == 3 else torchvision.io.ImageReadMode.GRAY
    try:
        image = torchvision.io.decode_image(path, mode=mode)
    except RuntimeError:
        from PIL import Image  # only for the formats torchvision.io does not decode

        with Image.open(path) as pil:
            pil = pil.convert("RGB" if channels == 3 else "L")
            image = torchvision.transforms.v2.functional.pil_to_tensor(pil)
    return image[0] if image.ndim == 4 else image  # an animated GIF: its first frame


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class FolderImages(Dataset):
    """Images decoded from files on demand (torchvision ImageFolder layout), as uint8 tensors.

    A file that cannot be decoded is skipped (see the comment above _MAX_BAD_FRACTION).
    """

    def __init__(
        self, folder: torchvision.datasets.ImageFolder, channels: int, transform=None
    ) -> None:
        self.root = folder.root
        self.samples, self.channels, self.transform = folder.samples, channels, transform
        # In shared memory, so that the data-loader workers (forked or spawned) and the main
        # process see the same bad files: each is decoded, and reported, once.
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        self.bad_limit = max(_MIN_BAD_LIMIT, int(_MAX_BAD_FRACTION * len(self.samples)))
        self.owner_pid = os.getpid()
        _LIVE_FOLDERS.add(self)
        # Not __del__: a tensor attribute of an object with __del__ in a reference cycle at
        # interpreter exit trips an internal assert of torch (abort, exit code -6).
        weakref.finalize(self, _record_skipped, self.root, self.samples, self.bad, os.getpid())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        # The requested image, or the next good one when it cannot be decoded.
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if self.bad[i]:
                continue
            path, label = self.samples[i]
            try:
                image = _decode_file(path, self.channels)
            except (OSError, RuntimeError, ValueError) as exc:
                self._mark_bad(i, exc)
                continue
            return (self.transform(image) if self.transform else image), label
        raise TooManyUndecodableImages(f"no image in {self.root} can be decoded")

    def _mark_bad(self, i: int, exc: Exception) -> None:
        self.bad[i] = True
        count = int(self.bad.sum())
        path = self.samples[i][0]
        if count > self.bad_limit:
            raise TooManyUndecodableImages(
                f"{count} of {len(self)} images in {self.root} cannot be decoded (the last: "
                f"{path}: {_reason(exc)}): the copy looks broken; check or re-copy the files"
            )
        warnings.warn(
            f"skipped {path}: cannot decode it ({_reason(exc)}); "
            f"{count} of {len(self)} images skipped so far",
            UndecodableImageWarning,
            stacklevel=2,
        )

    def skipped_files(self) -> list[str]:
        """The files found undecodable so far (by this process or its data-loader workers)."""
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def check_sample(self, size: int = _SAMPLE_SIZE) -> None:
        """Decode ``size`` files spread over the folder: a folder where most cannot be decoded
        is a user mistake (wrong folder, not images), reported before any training starts."""
        last = len(self) - 1
        picks = (
            sorted({round(k * last / max(size - 1, 1)) for k in range(size)}) if last >= 0 else []
        )
        failures = []
        for i in picks:
            try:
                _decode_file(self.samples[i][0], self.channels)
            except (OSError, RuntimeError, ValueError) as exc:
                failures.append((i, exc))
        if failures and 2 * len(failures) > len(picks):
            i, exc = failures[0]
            raise DataError(
                f"{len(failures)} of {len(picks)} files sampled from {self.root} cannot be "
                f"decoded as images (e.g. {self.samples[i][0]}: {_reason(exc)}): data.root must "
                "hold image files (JPEG, PNG, WebP, GIF, BMP, TIFF) in one sub-folder per class"
            )
        for i, exc in failures:
            self._mark_bad(i, exc)


def _record_skipped(root: str, samples: list, bad: torch.Tensor, owner_pid: int) -> None:
    # Only in the process that made the data set: a worker's copy exits without a report.
    if owner_pid == os.getpid() and bad.any():
        files = [samples[i][0] for i in bad.nonzero().flatten().tolist()]
        _SKIPPED.setdefault(root, (len(samples), set()))[1].update(files)


def _unreported() -> dict[str, tuple[int, set[str]]]:
    """This process's bad files not reported yet: root -> (images, bad files)."""
    for dataset in list(_LIVE_FOLDERS):
        _record_skipped(dataset.root, dataset.samples, dataset.bad, dataset.owner_pid)
    left = {}
    for root, (total, files) in _SKIPPED.items():
        new = files - _REPORTED.get(root, set())
        if new:
            left[root] = (total, new)
    return left


def _summaries(skipped: dict[str, tuple[int, set[str]]]) -> list[str]:
    lines = []
    for root, (total, files) in skipped.items():
        shown = sorted(files)
        listed = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
        lines.append(
            f"warning: {len(shown)} of {total} images in {root} could not be decoded "
            f"and were skipped: {listed}"
        )
    return lines


def skipped_summaries() -> list[str]:
    """One line per image folder of this process that had files skipped and not reported yet."""
    return _summaries(_unreported())


def all_ranks_skipped_summaries() -> list[str]:
    """One line per image folder for every process together, on rank 0 ([] on the others);
    the files in it are then not reported again at exit.

    A collective under DDP: every rank must call it at the same moment, while the process group
    is still up. Ranks read different shards of a folder (and different ones every epoch), so
    the bad files are merged as sets: a file met by two ranks counts once.
    """
    mine = _unreported()
    merged: dict[str, tuple[int, set[str]]] = {}
    for theirs in gather_objects(mine):
        for root, (total, files) in theirs.items():
            merged.setdefault(root, (total, set()))[1].update(files)
    for root, (_, files) in mine.items():
        _REPORTED.setdefault(root, set()).update(files)
    return _summaries(merged) if rank() == 0 else []


@atexit.register
def _report_skipped() -> None:
    """What no report of all ranks covered: a run stopped by an error or Ctrl-C, or a script
    that makes no such report. Each process reports its own files: this late, the other
    processes cannot be asked (Lightning's own exit handler may have destroyed the process
    group already, and a rank that failed never joins a collective)."""
    for line in skipped_summaries():
        print(line, file=sys.stderr)
