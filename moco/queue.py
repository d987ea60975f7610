"""The queue of negative keys: a fixed-size FIFO over the most recent encoded keys."""

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """Ring buffer of ``size`` L2-normalised keys of dimension ``dim``.

    ``keys`` and ``ptr`` are registered buffers, so they move with the module (``.to(device)``)
    and are saved in every checkpoint: a resumed run continues with the same negatives.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"KeyQueue needs size >= 1 and dim >= 1, got size={size}, dim={dim}")
        # Random unit vectors until real keys arrive: the official implementation starts the
        # same way, and a zero vector would make every initial negative logit exactly 0.
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # K x C
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B x C, B <= size) at ``ptr``, wrapping around the end; oldest go first.

        Any batch size works, so the last short batch of an epoch needs no special case.
        """
        batch = keys.shape[0]
        if batch > self.size:
            raise ValueError(f"cannot enqueue {batch} keys into a queue of size {self.size}")
        ptr = int(self.ptr)
        rows = (torch.arange(batch, device=self.keys.device) + ptr) % self.size  # B
        self.keys[rows] = keys.detach().to(self.keys.dtype)
        self.ptr.fill_((ptr + batch) % self.size)
