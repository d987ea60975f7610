"""Reader for the idx format of (Fashion-)MNIST, plain or gzip-compressed."""

import gzip
from pathlib import Path

import numpy as np
import torch

# Third byte of the magic number -> element type (the idx specification).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> torch.Tensor:
    """Read an idx file (``.gz`` or not) into a tensor of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile) as exc:  # an interrupted download or copy
        raise ValueError(f"{path} is truncated or not gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: expected {int(np.prod(shape))} values, got {data.size}"
        )
    return torch.from_numpy(data.astype(data.dtype.newbyteorder("="), copy=True).reshape(shape))
