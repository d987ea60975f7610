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


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _SplitStatistics:
    """The training-mode forward of a BatchNorm whose statistics are computed per split of the
    batch, for any number of dimensions after the channels; mixed into BatchNorm1d and 2d.

    Sample ``i`` belongs to split ``i % num_splits``. Running statistics are updated with the
    average of the per-split statistics. In eval mode the layer is the plain BatchNorm it is
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
        n, c = x.shape[:2]
        splits = self.num_splits
        if n % splits == 0:
            # Fast path: fold the splits into channels so one batch_norm call does all of them.
            # view(n/s, s*c, ...): channel j*c + ch of row b is channel ch of sample b*s + j.
            folded = x.reshape(n // splits, c * splits, *x.shape[2:])
            out = self._norm(
                folded, self.running_mean.repeat(splits), self.running_var.repeat(splits), splits
            )
            # The fold is a copy in NCHW; give the next layer the layout it was given (NHWC
            # when the encoder runs channels_last), or every later conv pays a conversion.
            return out.reshape(x.shape).contiguous(memory_format=_memory_format(x))
        # Batch not divisible (e.g. a short last batch): normalise each split on its own.
        out = torch.empty_like(x)
        means, vars_ = [], []
        for j in range(min(splits, n)):
            rm, rv = self.running_mean.clone(), self.running_var.clone()
            out[j::splits] = F.batch_norm(
                x[j::splits], rm, rv, self.weight, self.bias, True, self._momentum(), self.eps
            )
            means.append(rm)
            vars_.append(rv)
        self._store_running(torch.stack(means).mean(0), torch.stack(vars_).mean(0))
        return out

    def _norm(self, folded: torch.Tensor, rm: torch.Tensor, rv: torch.Tensor, splits: int):
        weight = self.weight.repeat(splits) if self.weight is not None else None
        bias = self.bias.repeat(splits) if self.bias is not None else None
        out = F.batch_norm(folded, rm, rv, weight, bias, True, self._momentum(), self.eps)
        c = self.num_features
        self._store_running(rm.view(splits, c).mean(0), rv.view(splits, c).mean(0))
        return out

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
    """BatchNorm2d with per-split training statistics: the backbone's BatchNorm on the key side."""


class SplitBatchNorm1d(_SplitStatistics, nn.BatchNorm1d):
    """BatchNorm1d with per-split training statistics, for (N, C) or (N, C, L) inputs: the
    BatchNorm of an MLP head whose key side must not see the statistics of the queries' batch
    either."""
