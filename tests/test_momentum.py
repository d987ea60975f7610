"""momentum_update and cosine_momentum, then the key encoder of a real MoCo during training."""

from __future__ import annotations

import itertools
import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from moco.momentum import cosine_momentum, momentum_update

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- momentum_update
def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():  # distinct running statistics, to see that they are left alone
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(seed + 3)
    return net


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("m", [0.9, 0.5, 0.999, 0.0, 1.0])
def test_momentum_update_formula_on_every_parameter(m):
    online, target = small_net(0), small_net(1)
    online_before, target_before = snapshot(online), snapshot(target)
    momentum_update(online, target, m)
    param_names = [name for name, _ in target.named_parameters()]
    assert len(param_names) == 5
    for name, p in target.named_parameters():
        expected = m * target_before[name] + (1 - m) * online_before[name]
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-6, msg=name)
    # The online network is never changed.
    for name, t in online.state_dict().items():
        assert torch.equal(t, online_before[name]), name


def test_momentum_zero_copies_and_one_keeps_exactly():
    online, target = small_net(0), small_net(1)
    momentum_update(online, target, 0.0)
    for (name, p), q in zip(target.named_parameters(), online.parameters(), strict=True):
        assert torch.equal(p, q), name
    online, target = small_net(0), small_net(1)
    before = snapshot(target)
    momentum_update(online, target, 1.0)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name]), name


def test_momentum_update_leaves_buffers_untouched():
    online, target = small_net(0), small_net(1)
    before = snapshot(target)
    momentum_update(online, target, 0.3)
    for name, buf in target.named_buffers():
        assert torch.equal(buf, before[name]), name
    assert not torch.equal(target[1].running_mean, online[1].running_mean)


def test_momentum_update_is_not_tracked_by_autograd():
    online, target = small_net(0), small_net(1)
    momentum_update(online, target, 0.5)
    for p in target.parameters():
        assert p.grad_fn is None


def test_momentum_update_rejects_mismatched_modules():
    with pytest.raises((ValueError, RuntimeError)):
        momentum_update(nn.Linear(3, 4), nn.Linear(3, 4, bias=False), 0.9)


# --------------------------------------------------------------------------- cosine_momentum
@pytest.mark.parametrize("base", [0.99, 0.9, 0.996])
def test_cosine_momentum_endpoints_middle_and_monotone(base):
    total = 40
    values = [cosine_momentum(base, s, total) for s in range(total + 1)]
    assert values[0] == pytest.approx(base, abs=1e-12)
    assert values[-1] == pytest.approx(1.0, abs=1e-12)
    assert values[total // 2] == pytest.approx(base + (1 - base) / 2, abs=1e-12)
    # Hand formula at one step inside: 1 - (1 - base) * (cos(pi * s / T) + 1) / 2
    assert values[10] == pytest.approx(1 - (1 - base) * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    assert all(b > a for a, b in itertools.pairwise(values))
    # Past the end it stays at 1; with no known total it stays at base.
    assert cosine_momentum(base, 2 * total, total) == pytest.approx(1.0)
    assert cosine_momentum(base, 5, 0) == base


# ------------------------------------------------------------------- the key encoder in MoCo
def images(seed: int, n: int = 8, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturb(module: nn.Module, seed: int, scale: float = 0.05) -> None:
    """Make the query encoder differ from the key encoder (they start equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def named_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def shuffled_keys(encoder: nn.Module, view: torch.Tensor, seed_state: torch.Tensor) -> torch.Tensor:
    """Reference for the key path: the batch encoded in the order of torch.randperm drawn from
    ``seed_state``, put back in order, L2-normalised."""
    torch.set_rng_state(seed_state)
    perm = torch.randperm(view.shape[0])
    with torch.no_grad():
        out = encoder(view[perm])
    unperm = torch.empty_like(out)
    unperm[perm] = out  # row perm[j] of the batch is row j of the output
    return F.normalize(unperm, dim=1)


def reference_loss(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float):
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negatives.T], dim=1) / t
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def test_training_step_updates_key_encoder_then_encodes_keys_and_enqueues(tiny_moco):
    model, cfg = tiny_moco("model.momentum=0.9")
    model.train()
    m, t = cfg.model.momentum, cfg.model.temperature
    assert cfg.model.bn_splits == 2
    perturb(model.encoder_q, seed=0)
    q_old, k_old = named_params(model.encoder_q), named_params(model.encoder_k)
    assert any(name.startswith("head.") for name in k_old)
    assert any(name.startswith("backbone.") for name in k_old)
    model.queue.ptr.fill_(60)  # the 8 new keys wrap around the 64-row queue: rows 60..63, 0..3
    queue_before = model.queue.keys.clone()
    view_q, view_k = images(1), images(2)

    # The step's only random draw is the shuffle's torch.randperm on the global CPU generator;
    # saving the generator state lets the reference replay the same permutation. (If the shuffle
    # ever gets its own generator, replay that one instead.)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    loss = model.training_step(((view_q, view_k), torch.zeros(8, dtype=torch.long)), 0)

    # (a) every key-encoder parameter, backbone AND head: m * k_old + (1 - m) * q_old.
    for name, p in model.encoder_k.named_parameters():
        expected = m * k_old[name] + (1 - m) * q_old[name]
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=name)
        assert not torch.allclose(p.detach(), k_old[name]), f"{name} did not move"

    # (b) the key encoder takes no gradient.
    loss.backward()
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name
    assert all(p.grad is not None for p in model.encoder_q.parameters())

    # (d) ptr advanced by the batch, exactly rows 60..63 and 0..3 changed, to unit-norm keys
    # of the key view from the *updated* key encoder, shuffled through its 2 BN splits.
    assert int(model.queue.ptr) == (60 + 8) % 64
    rows = [60, 61, 62, 63, 0, 1, 2, 3]
    untouched = [r for r in range(64) if r not in rows]
    assert torch.equal(model.queue.keys[untouched], queue_before[untouched])
    new = model.queue.keys[rows]
    torch.testing.assert_close(new.norm(dim=1), torch.ones(8), atol=1e-5, rtol=0)
    k_ref = shuffled_keys(model.encoder_k, view_k, rng)
    torch.testing.assert_close(new, k_ref, atol=1e-5, rtol=1e-4)

    # The loss contrasts against the queue as it was *before* this step's keys entered it.
    q_ref = F.normalize(model.encoder_q(view_q), dim=1)
    expected_loss = reference_loss(q_ref, k_ref, queue_before, t)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)


def test_keys_depend_on_the_shuffle_so_the_reference_above_is_discriminating(tiny_moco):
    """With SplitBatchNorm, a different permutation gives different keys: the queue check of the
    previous test really pins down the shuffle and the split assignment."""
    model, _ = tiny_moco()
    model.train()
    view = images(3)
    torch.manual_seed(1)
    a = shuffled_keys(model.encoder_k, view, torch.get_rng_state())
    torch.manual_seed(2)
    b = shuffled_keys(model.encoder_k, view, torch.get_rng_state())
    assert not torch.allclose(a, b, atol=1e-4)


def replayable_step(model, view_q, view_k, seed: int):
    """One training step of ``model`` (query encoder perturbed away from the key encoder) on a
    batch of 8, returning ``(loss, queue before the step, RNG state the shuffle drew from)``."""
    model.train()
    perturb(model.encoder_q, seed=seed)
    queue_before = model.queue.keys.clone()
    torch.manual_seed(seed + 3)
    rng = torch.get_rng_state()
    loss = model.training_step(((view_q, view_k), torch.zeros(8, dtype=torch.long)), 0)
    return loss, queue_before, rng


def test_symmetric_step_enqueues_both_directions(tiny_moco):
    model, cfg = tiny_moco("model.symmetric=true", "model.momentum=0.9")
    t = cfg.model.temperature
    view_q, view_k = images(5), images(6)
    loss, queue_before, rng = replayable_step(model, view_q, view_k, seed=4)

    # (e) ptr advances by 2 x batch; rows 0..7 are keys of view_k, rows 8..15 keys of view_q.
    assert int(model.queue.ptr) == 16
    assert torch.equal(model.queue.keys[16:], queue_before[16:])
    k_of_view_k = shuffled_keys(model.encoder_k, view_k, rng)
    k_of_view_q = shuffled_keys(model.encoder_k, view_q, torch.get_rng_state())
    torch.testing.assert_close(model.queue.keys[:8], k_of_view_k, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.queue.keys[8:16], k_of_view_q, atol=1e-5, rtol=1e-4)

    q1 = F.normalize(model.encoder_q(view_q), dim=1)
    q2 = F.normalize(model.encoder_q(view_k), dim=1)
    expected = reference_loss(q1, k_of_view_k, queue_before, t) + reference_loss(
        q2, k_of_view_q, queue_before, t
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_neighbour_positives_step_takes_the_queues_nearest_key_and_enqueues_its_own(
    tiny_moco, weight
):
    """model.neighbour_weight w: that share of the loss takes as each query's positive the row
    of the queue (as it was before the step) nearest its key, with that row left out of its
    negatives; the rest is MoCo's own-key loss. The queue still receives the step's own keys."""
    model, cfg = tiny_moco(f"model.neighbour_weight={weight}", "model.momentum=0.9")
    t = cfg.model.temperature
    view_q, view_k = images(9), images(10)
    loss, queue_before, rng = replayable_step(model, view_q, view_k, seed=8)

    k_ref = shuffled_keys(model.encoder_k, view_k, rng)
    torch.testing.assert_close(model.queue.keys[:8], k_ref, atol=1e-5, rtol=1e-4)
    nearest = (k_ref @ queue_before.T).argmax(dim=1)
    q_ref = F.normalize(model.encoder_q(view_q), dim=1)
    positive = (q_ref * queue_before[nearest]).sum(1, keepdim=True)
    logits = torch.cat([positive, q_ref @ queue_before.T], dim=1) / t
    logits[torch.arange(8), 1 + nearest] = float("-inf")
    neighbour_loss = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    own_loss = reference_loss(q_ref, k_ref, queue_before, t)
    expected = (1 - weight) * own_loss + weight * neighbour_loss
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    # Not the loss of the plain step: the option changes what is learnt.
    assert not torch.allclose(loss, own_loss, atol=1e-3)


def test_model_state_dict_holds_the_queue(tiny_moco):
    model, _ = tiny_moco()
    state = model.state_dict()
    assert torch.equal(state["queue.keys"], model.queue.keys)
    assert "queue.ptr" in state


# ------------------------------------------------------------- the same inside a real Trainer
class PairDataset(Dataset):
    def __init__(self, n: int, size: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, 3, size, size, generator=g)
        self.b = torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), 0


def quiet_cpu_trainer(**kwargs) -> pl.Trainer:
    """A one-device fp32 CPU Trainer that writes nothing: no logger, checkpoints or bars."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class Snapshots(pl.Callback):
    """Parameters of both encoders at the start and the end of every training batch."""

    def __init__(self) -> None:
        self.start: list[tuple[dict, dict]] = []
        self.end: list[dict] = []
        self.queue_ptr: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append((named_params(pl_module.encoder_q), named_params(pl_module.encoder_k)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(named_params(pl_module.encoder_k))
        self.queue_ptr.append(int(pl_module.queue.ptr))


def test_in_a_trainer_key_encoder_follows_the_query_encoder_of_before_the_step(tiny_moco):
    # m = 0.5 and a large lr make the update big enough to tell q before/after the step apart.
    # The cosine schedule over 2 steps gives m = 1 - (1 - 0.5) * (cos(pi / 2) + 1) / 2 = 0.75 at
    # step 1 (the constant schedule is covered by the training_step test above).
    model, _ = tiny_moco("model.momentum=0.5", "model.momentum_schedule=cosine", "optimizer.lr=3.0")
    expected_m = 0.75
    snaps = Snapshots()
    trainer = quiet_cpu_trainer(max_epochs=1, max_steps=2, callbacks=[snaps])
    torch.manual_seed(0)
    trainer.fit(model, DataLoader(PairDataset(16), batch_size=8, drop_last=True))
    assert trainer.global_step == 2 and len(snaps.start) == 2

    # Step 0: the encoders start equal, so nothing changes. Step 1: q has had one optimizer
    # step; k must move towards q as it was at the start of step 1 (before step 1's update).
    q_old, k_old = snaps.start[1]
    k_new = snaps.end[1]
    moved_q = False
    for name in k_old:
        expected = expected_m * k_old[name] + (1 - expected_m) * q_old[name]
        torch.testing.assert_close(k_new[name], expected, atol=1e-6, rtol=1e-5, msg=name)
        moved_q |= not torch.allclose(q_old[name], k_old[name], atol=1e-5)
    assert moved_q, "the optimizer step did not change the query encoder: test is vacuous"
    # The update with the query encoder *after* the step would be measurably different.
    q_after = named_params(model.encoder_q)
    diff = max(
        (expected_m * k_old[n] + (1 - expected_m) * q_after[n] - k_new[n]).abs().max().item()
        for n in k_old
    )
    assert diff > 1e-4

    # (b) no gradient ever reached the key encoder.
    for name, p in model.encoder_k.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # (c) the optimizer holds exactly the query encoder's parameters.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.encoder_q.parameters()}
    assert not optimized & {id(p) for p in model.encoder_k.parameters()}
    # (d) one batch of keys per step.
    assert snaps.queue_ptr == [8, 16]


def test_trainer_with_max_steps_only_can_configure_the_optimizer(tiny_moco):
    model, _ = tiny_moco()
    trainer = quiet_cpu_trainer(max_steps=1)
    trainer.fit(model, DataLoader(PairDataset(8), batch_size=8, drop_last=True))
    assert trainer.global_step == 1
