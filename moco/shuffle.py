"""Shuffle-BN on a single device: encode the key batch in a random order, return it in order."""

import torch
from torch import nn


def encode_shuffled(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``encoder(images)`` computed on a random permutation of the batch, then un-permuted.

    With SplitBatchNorm, the split a sample is normalised in depends on its position, so the key
    of sample i is normalised with other samples than the query of sample i: the BN statistics
    cannot leak which key belongs to which query. Output rows are in the input's order.
    """
    perm = torch.randperm(images.shape[0], device=images.device)  # N
    encoded = encoder(images[perm])  # N x C, row j is sample perm[j]
    return encoded[torch.argsort(perm)]  # N x C, row i is sample i
