"""SplitBatchNorm against nn.BatchNorm2d applied to each split separately (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moco.batchnorm import SplitBatchNorm, SplitBatchNorm1d, split_sizes

DT = torch.float64
TOL = {"atol": 1e-12, "rtol": 1e-10}
C = 3


def make_split_bn(num_splits: int, seed: int = 0, momentum: float | None = 0.1) -> SplitBatchNorm:
    """A SplitBatchNorm with non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    bn = SplitBatchNorm(C, num_splits=num_splits, momentum=momentum).to(DT)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(C, generator=g, dtype=DT) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g, dtype=DT))
        bn.running_mean.copy_(torch.randn(C, generator=g, dtype=DT))
        bn.running_var.copy_(torch.rand(C, generator=g, dtype=DT) + 0.5)
        bn.num_batches_tracked.fill_(4)
    return bn


def plain_copy(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """An nn.BatchNorm2d with the same parameters, statistics and hyper-parameters."""
    ref = nn.BatchNorm2d(C, eps=bn.eps, momentum=bn.momentum).to(DT)
    ref.load_state_dict(nn.BatchNorm2d.state_dict(bn))
    return ref


def batch(n: int, seed: int = 1, h: int = 4, w: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Each sample gets its own offset and scale so that the splits have clearly different stats.
    x = torch.randn(n, C, h, w, generator=g, dtype=DT)
    return x * (1 + torch.arange(n, dtype=DT).view(n, 1, 1, 1)) + torch.arange(n, dtype=DT).view(
        n, 1, 1, 1
    )


def blocks(n: int, splits: int) -> list[list[int]]:
    """The members of each split, written out: contiguous blocks whose sizes differ by at most
    one, the larger first, as the ranks of a DDP run would hold the batch."""
    parts = min(n, splits)
    sizes = [n // parts + (1 if j < n % parts else 0) for j in range(parts)]
    starts = [sum(sizes[:j]) for j in range(parts)]
    return [list(range(start, start + size)) for start, size in zip(starts, sizes, strict=True)]


def reference_forward(bn: SplitBatchNorm, x: torch.Tensor, upstream: torch.Tensor):
    """One nn.BatchNorm2d per split (``blocks``), all starting from bn's state.

    Returns the output, the running mean/var averaged over the splits, and the gradients of
    sum(out * upstream) with respect to x, weight and bias.
    """
    x = x.detach().clone().requires_grad_()
    out = torch.zeros_like(x)
    copies = []
    for idx in blocks(x.shape[0], bn.num_splits):
        ref = plain_copy(bn).train()
        part = ref(x[idx])
        out = out.index_put((torch.tensor(idx),), part)
        copies.append(ref)
    (out * upstream).sum().backward()
    mean = torch.stack([r.running_mean for r in copies]).mean(0)
    var = torch.stack([r.running_var for r in copies]).mean(0)
    grads = (x.grad, sum(r.weight.grad for r in copies), sum(r.bias.grad for r in copies))
    return out.detach(), mean, var, grads


def split_forward(bn: SplitBatchNorm, x: torch.Tensor, upstream: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    bn.train()
    bn.zero_grad()
    out = bn(x)
    (out * upstream).sum().backward()
    return out.detach(), (x.grad, bn.weight.grad.clone(), bn.bias.grad.clone())


CASES = [
    pytest.param(8, 2, id="divisible-8/2"),
    pytest.param(12, 4, id="divisible-12/4"),
    pytest.param(6, 3, id="divisible-6/3"),
    pytest.param(7, 3, id="non-divisible-7/3"),
    pytest.param(5, 2, id="non-divisible-5/2"),
    pytest.param(9, 4, id="non-divisible-9/4"),
    pytest.param(2, 3, id="fewer-samples-than-splits-2/3"),
]


@pytest.mark.parametrize("n,splits", CASES)
def test_train_mode_equals_batchnorm_per_split(n, splits):
    bn = make_split_bn(splits)
    x, up = batch(n), batch(n, seed=2)
    ref_out, ref_mean, ref_var, ref_grads = reference_forward(bn, x, up)
    out, grads = split_forward(bn, x, up)
    assert out.shape == x.shape and out.dtype == DT
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(bn.running_mean, ref_mean, **TOL)
    torch.testing.assert_close(bn.running_var, ref_var, **TOL)
    assert int(bn.num_batches_tracked) == 5
    for got, want, name in zip(grads, ref_grads, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got, want, **TOL, msg=name)


def test_splits_are_contiguous_blocks_not_interleaved_samples():
    """Interleaved samples (i % 2) would be another split: the reference must tell them apart."""
    bn = make_split_bn(2)
    x = batch(8)
    out, _ = split_forward(bn, x, torch.ones_like(x))
    interleaved = torch.empty_like(x)
    interleaved[0::2] = plain_copy(make_split_bn(2)).train()(x[0::2]).detach()
    interleaved[1::2] = plain_copy(make_split_bn(2)).train()(x[1::2]).detach()
    assert not torch.allclose(out, interleaved, atol=1e-3)
    halves = torch.cat([plain_copy(make_split_bn(2)).train()(half) for half in (x[:4], x[4:])])
    torch.testing.assert_close(out, halves.detach(), **TOL)


@pytest.mark.parametrize(
    "n,splits,sizes",
    [(8, 4, [2] * 4), (9, 4, [3, 2, 2, 2]), (11, 4, [3, 3, 3, 2]), (2, 3, [1, 1]), (5, 1, [5])],
)
def test_split_sizes_differ_by_at_most_one_and_are_never_empty(n, splits, sizes):
    assert split_sizes(n, splits) == sizes


def test_channels_last_gradient_stays_channels_last():
    """The next layer's backward gets its gradient in the layout its forward ran in: a conversion
    there would cost what the splits in blocks save."""
    x = batch(8).contiguous(memory_format=torch.channels_last).requires_grad_()
    upstream = batch(8, seed=2).contiguous(memory_format=torch.channels_last)
    (make_split_bn(4).train()(x) * upstream).sum().backward()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_running_stats_are_the_average_of_per_split_statistics_by_hand():
    """Momentum 0.1: running <- 0.9 running + 0.1 * average over splits of split mean / var."""
    bn = make_split_bn(2)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    x = batch(6)
    split_forward(bn, x, torch.ones_like(x))
    means, variances = [], []
    for j in range(2):
        part = x[3 * j : 3 * (j + 1)].transpose(0, 1).reshape(C, -1)  # C x (n/2 * H * W)
        means.append(part.mean(1))
        variances.append(part.var(1, unbiased=True))
    torch.testing.assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * torch.stack(means).mean(0), **TOL)
    torch.testing.assert_close(
        bn.running_var, 0.9 * rv0 + 0.1 * torch.stack(variances).mean(0), **TOL
    )


@pytest.mark.parametrize("n", [8, 7], ids=["divisible", "non-divisible"])
def test_cumulative_momentum_none_over_two_steps(n):
    bn = make_split_bn(2, momentum=None)
    for step, seed in enumerate((3, 4)):
        x = batch(n, seed=seed)
        _, ref_mean, ref_var, _ = reference_forward(bn, x, torch.ones_like(x))
        split_forward(bn, x, torch.ones_like(x))
        torch.testing.assert_close(bn.running_mean, ref_mean, **TOL)
        torch.testing.assert_close(bn.running_var, ref_var, **TOL)
        assert int(bn.num_batches_tracked) == 5 + step


def test_channels_last_input_gives_the_same_result():
    x = batch(8)
    a, b = make_split_bn(4), make_split_bn(4)
    out_a, _ = split_forward(a, x, torch.ones_like(x))
    out_b, _ = split_forward(b, x.contiguous(memory_format=torch.channels_last), torch.ones_like(x))
    torch.testing.assert_close(out_b, out_a, **TOL)
    torch.testing.assert_close(b.running_mean, a.running_mean, **TOL)


@pytest.mark.parametrize(
    "n",
    [
        pytest.param(8, id="divisible"),
        pytest.param(7, id="non-divisible"),
    ],
)
def test_train_mode_keeps_the_channels_last_memory_format(n):
    """nn.BatchNorm2d keeps NHWC; SplitBatchNorm sits between channels_last convolutions
    (Encoder(channels_last=True), the default config) so it should too."""
    x = batch(n).contiguous(memory_format=torch.channels_last)
    assert nn.BatchNorm2d(C).to(DT).train()(x).is_contiguous(memory_format=torch.channels_last)
    out = make_split_bn(4).train()(x)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("n", [8, 7, 1])
def test_eval_mode_is_plain_batchnorm_with_the_running_stats(n):
    bn = make_split_bn(4).eval()
    ref = plain_copy(bn).eval()
    x = batch(n)
    with torch.no_grad():
        out = bn(x)
        expected = (x - bn.running_mean.view(1, C, 1, 1)) / torch.sqrt(
            bn.running_var.view(1, C, 1, 1) + bn.eps
        ) * bn.weight.view(1, C, 1, 1) + bn.bias.view(1, C, 1, 1)
        torch.testing.assert_close(out, ref(x), **TOL)
    torch.testing.assert_close(out, expected, **TOL)
    # Eval never changes the statistics.
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=0, atol=0)
    assert int(bn.num_batches_tracked) == 4


def test_one_split_is_plain_batchnorm():
    bn = make_split_bn(1)
    ref = plain_copy(bn).train()
    x, up = batch(6), batch(6, seed=2)
    xr = x.clone().requires_grad_()
    expected = ref(xr)
    (expected * up).sum().backward()
    out, grads = split_forward(bn, x, up)
    torch.testing.assert_close(out, expected.detach(), **TOL)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, **TOL)
    torch.testing.assert_close(bn.running_var, ref.running_var, **TOL)
    torch.testing.assert_close(grads[0], xr.grad, **TOL)
    torch.testing.assert_close(grads[1], ref.weight.grad, **TOL)


def test_more_splits_really_differ_from_plain_batchnorm():
    x = batch(8)
    out_split, _ = split_forward(make_split_bn(2), x, torch.ones_like(x))
    out_plain = plain_copy(make_split_bn(2)).train()(x).detach()
    assert not torch.allclose(out_split, out_plain, atol=1e-3)


def test_invalid_num_splits_raises():
    with pytest.raises(ValueError):
        SplitBatchNorm(4, num_splits=0)


@pytest.mark.parametrize("n,splits", [(8, 2), (12, 4), (7, 3)], ids=["8/2", "12/4", "7/3"])
def test_1d_train_mode_equals_batchnorm1d_per_split(n, splits):
    """The BatchNorm of the mlp_bn head: (N, C) rows, normalised per split (``blocks``)."""
    bn = SplitBatchNorm1d(C, num_splits=splits).to(DT)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=DT))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=DT))
    x = batch(n, h=1, w=1).flatten(1)  # N x C, each sample with its own offset and scale
    want = torch.empty_like(x)
    refs = []
    for idx in blocks(n, splits):
        ref = nn.BatchNorm1d(C).to(DT).train()
        ref.load_state_dict(nn.BatchNorm1d.state_dict(bn))
        want[idx] = ref(x[idx]).detach()
        refs.append(ref)
    got = bn.train()(x)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(
        bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0), **TOL
    )
    torch.testing.assert_close(
        bn.running_var, torch.stack([r.running_var for r in refs]).mean(0), **TOL
    )
    # Whole-batch statistics would differ: the splits really are normalised apart.
    assert not torch.allclose(got, nn.BatchNorm1d(C).to(DT).train()(x).detach(), atol=1e-3)


def test_1d_eval_mode_is_plain_batchnorm1d_and_refuses_images():
    bn = SplitBatchNorm1d(C, num_splits=4).to(DT).eval()
    ref = nn.BatchNorm1d(C).to(DT).eval()
    ref.load_state_dict(nn.BatchNorm1d.state_dict(bn))
    x = batch(5, h=1, w=1).flatten(1)
    torch.testing.assert_close(bn(x), ref(x), **TOL)
    with pytest.raises(ValueError, match="2D or 3D"):
        bn(batch(4))


def test_each_split_bn_is_the_batchnorm_of_its_own_input_kind_only():
    """Code that tells BatchNorm kinds apart (SyncBN conversion, export) must not take the head's
    1d split BN for an image BN, nor the reverse."""
    one_d, two_d = SplitBatchNorm1d(C, num_splits=2), SplitBatchNorm(C, num_splits=2)
    assert isinstance(one_d, nn.BatchNorm1d) and not isinstance(one_d, nn.BatchNorm2d)
    assert isinstance(two_d, nn.BatchNorm2d) and not isinstance(two_d, nn.BatchNorm1d)
