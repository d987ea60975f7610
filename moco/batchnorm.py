"""SplitBatchNorm: shuffle-BN emulated on a single device.

MoCo's key encoder must not see the batch statistics of the very samples the queries come from,
or the network "cheats": it matches query and key through the shared BN mean/variance instead of
through image content (MoCo paper, Sec. 3.3). Across GPUs this is done by shuffling the key batch
between ranks. On one device we split the batch into ``num_splits`` groups that are normalised
independently, like ``num_splits`` GPUs would, and shuffle the key batch before it is split.
"""

import torch
import torch.nn.functional as F
from torch import nn


def split_sizes(n: int, num_splits: int) -> list[int]:
    """Sizes of the contiguous splits of a batch of ``n``: as equal as possible, the larger first,
    never empty (fewer splits than ``num_splits`` when ``n`` is smaller)."""
    parts = min(n, num_splits)
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra)


class _SplitStatistics:
    """The training-mode forward of a BatchNorm whose statistics are computed per split of the
    batch, for any number of dimensions after the channels; mixed into BatchNorm1d and 2d.

    The splits are contiguous blocks of the batch (``split_sizes``), as the ranks of a DDP run
    hold contiguous blocks of the global batch. Each is normalised by its own ``F.batch_norm``:
    a block of a channels_last batch is itself channels_last, so neither the forward nor the
    backward pass copies the activations into another layout, and autograd's backward of
    ``split`` and ``cat`` joins the gradients in one copy. Running statistics are updated with
    the average of the per-split statistics. In eval mode the layer is the plain BatchNorm it is
    mixed into, so its weights load into one, and ``isinstance`` tells the two kinds apart.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        momentum = self._momentum()
        outputs, means, variances = [], [], []
        for part in x.split(split_sizes(len(x), self.num_splits)):
            # Each split updates its own copy of the running statistics; they are averaged below.
            mean, var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(
                F.batch_norm(part, mean, var, self.weight, self.bias, True, momentum, self.eps)
            )
            means.append(mean)
            variances.append(var)
        self._store_running(torch.stack(means).mean(0), torch.stack(variances).mean(0))
        return torch.cat(outputs)

    def _momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        # momentum=None means a cumulative average, as in nn.BatchNorm2d.
        return 1.0 / float(self.num_batches_tracked + 1)

    @torch.no_grad()
    def _store_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        self.num_batches_tracked.add_(1)


class SplitBatchNorm(_SplitStatistics, nn.BatchNorm2d):
    """BatchNorm2d with per-split training statistics: the backbone's BatchNorm in both encoders,
    as each GPU's BatchNorm of a multi-GPU run normalises its own share of the batch."""


class SplitBatchNorm1d(_SplitStatistics, nn.BatchNorm1d):
    """BatchNorm1d with per-split training statistics, for (N, C) or (N, C, L) inputs: the
    BatchNorm of an MLP head whose key side must not see the statistics of the queries' batch
    either."""
