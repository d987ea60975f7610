"""Tests of moco.optim.LARS against MoCo v3's rule written out by hand, its zero-norm cases, its
use with the per-step LR schedule, and the lars / adamw config options (pretraining only)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import compose_config, with_values
from torch.optim.lr_scheduler import LambdaLR

from moco.errors import ConfigError
from moco.optim import LARS
from moco.optim.scheduled import scheduled_optimizer
from moco.optim.schedules import lr_factor
from moco.run.check import check_eval, check_pretrain

DT = torch.float64
# A matrix, a conv kernel, and two 1-D tensors (a bias, a norm layer's scale).
SHAPES = [(3, 4), (2, 3, 3, 3), (5,), (4,)]
HP = {"lr": 0.3, "momentum": 0.8, "weight_decay": 0.05, "trust_coefficient": 0.02}


def reference_step(p, g, buf, lr, momentum, weight_decay, trust_coefficient):
    """MoCo v3's LARS for one parameter, one step, transcribed literally; returns (p, buf)."""
    u = g
    if p.ndim > 1:
        u = g + weight_decay * p
        p_norm, u_norm = torch.norm(p), torch.norm(u)
        ratio = trust_coefficient * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.0
        u = u * ratio
    buf = momentum * buf + u
    return p - lr * buf, buf


def make_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=DT)) for s in SHAPES]


def grads_at(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


def test_several_steps_follow_the_rule_for_matrices_kernels_and_vectors():
    params = make_params()
    opt = LARS(params, **HP)
    ps = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for step in range(6):
        for p, g in zip(params, grads_at(step), strict=True):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads_at(step)):
            ps[i], bufs[i] = reference_step(ps[i], g, bufs[i], **HP)
        for p, ref in zip(params, ps, strict=True):
            torch.testing.assert_close(p.detach(), ref, atol=1e-12, rtol=0)
    # The gradients are left as the loop set them: decay and scaling go into a copy.
    for p, g in zip(params, grads_at(5), strict=True):
        assert torch.equal(p.grad, g)


def test_one_step_by_hand():
    # p = [3, 4] (norm 5), g = [1, -2], decay 0.5: u = g + 0.5 p = [2.5, 0] (norm 2.5), ratio
    # 0.1 * 5 / 2.5 = 0.2, scaled u = [0.5, 0]; lr 1: p = [2.5, 4]; buffer = [0.5, 0].
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=DT))
    p.grad = torch.tensor([[1.0, -2.0]], dtype=DT)
    opt = LARS([p], lr=1.0, momentum=0.9, weight_decay=0.5, trust_coefficient=0.1)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[2.5, 4.0]], dtype=DT))
    torch.testing.assert_close(
        opt.state[p]["momentum_buffer"], torch.tensor([[0.5, 0.0]], dtype=DT)
    )
    # Step 2 with no gradient signal left in u: g = -0.5 p makes u = 0, so the ratio is 1 and
    # only momentum moves p: buffer 0.9 * [0.5, 0], p - 1 * buffer.
    p.grad = -0.5 * p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([[2.05, 4.0]], dtype=DT))


def test_one_dimensional_parameters_get_neither_decay_nor_scaling():
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=DT))
    opt = LARS([bias], lr=0.1, momentum=0.5, weight_decay=10.0, trust_coefficient=1e-3)
    g = torch.tensor([0.5, 0.25, -1.0], dtype=DT)
    expected, buf = bias.detach().clone(), torch.zeros(3, dtype=DT)
    for _ in range(3):
        bias.grad = g.clone()
        opt.step()
        buf = 0.5 * buf + g  # plain momentum SGD on the raw gradient
        expected = expected - 0.1 * buf
    torch.testing.assert_close(bias.detach(), expected, atol=1e-15, rtol=0)


def test_a_zero_matrix_takes_the_raw_gradient_step():
    # ||p|| = 0: decay adds nothing and the ratio is 1, not 0 (which would freeze the matrix).
    w = torch.nn.Parameter(torch.zeros(2, 3, dtype=DT))
    w.grad = torch.arange(6, dtype=DT).reshape(2, 3)
    LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=1e-3).step()
    torch.testing.assert_close(w.detach(), -0.5 * torch.arange(6, dtype=DT).reshape(2, 3))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_zero_gradient_and_zero_tensors_give_no_nan(weight_decay):
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0]], dtype=DT))
    z = torch.nn.Parameter(torch.zeros(2, 2, dtype=DT))
    w.grad, z.grad = torch.zeros_like(w), torch.zeros_like(z)
    LARS([w, z], lr=1.0, weight_decay=weight_decay).step()
    assert torch.isfinite(w).all() and torch.equal(z.detach(), torch.zeros(2, 2, dtype=DT))
    if weight_decay == 0:
        torch.testing.assert_close(w.detach(), torch.tensor([[1.0, 2.0]], dtype=DT))
    else:  # the decay alone, rescaled to trust * ||w||: a step of length lr * 1e-3 * ||w||
        step = torch.tensor([[1.0, 2.0]], dtype=DT) - w.detach()
        torch.testing.assert_close(step.norm(), torch.tensor(1e-3 * math.sqrt(5.0), dtype=DT))


def test_the_step_is_scale_free_for_matrices():
    # The point of LARS: scaling a layer's gradient changes nothing (without decay).
    a, b = make_params(1)[0], make_params(1)[0]
    a.grad, b.grad = grads_at(0)[0], 1000.0 * grads_at(0)[0]
    LARS([a], lr=0.1).step()
    LARS([b], lr=0.1).step()
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_lr_is_outside_the_buffer_so_a_schedule_scales_the_whole_step():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=DT))
    opt = LARS([p], lr=1.0, momentum=0.9)
    sched = LambdaLR(opt, lambda step: 0.5**step)
    for step in range(3):
        before = p.detach().clone()
        p.grad = torch.ones(2, dtype=DT)
        opt.step()
        buf = opt.state[p]["momentum_buffer"]
        torch.testing.assert_close(before - p.detach(), 0.5**step * buf)
        sched.step()


def test_the_scheduled_builder_makes_lars_and_its_schedule_drives_the_lr():
    cfg = compose_config(["optimizer=lars", "scheduler=cosine", "scheduler.warmup_epochs=1"])
    params = make_params()
    opt, sched = scheduled_optimizer(params, cfg.optimizer, cfg.scheduler, 10, 2, lr=2.4)
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["trust_coefficient"]) == (
        cfg.optimizer.momentum,
        cfg.optimizer.weight_decay,
        cfg.optimizer.trust_coefficient,
    )
    name, warmup = cfg.scheduler.name, 2
    for step in range(10):
        assert group["lr"] == pytest.approx(2.4 * lr_factor(step, 10, name, warmup))
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads_at(step), strict=True):
            p.grad = g.clone()
        opt.step()
        for p, b in zip(params, before, strict=True):  # this step moved by the scheduled lr
            moved = b - p.detach()
            torch.testing.assert_close(moved, group["lr"] * opt.state[p]["momentum_buffer"])
        sched.step()


def test_the_builder_makes_adamw_with_the_configured_values():
    cfg = compose_config(["optimizer=adamw"])
    opt, _ = scheduled_optimizer(make_params(), cfg.optimizer, cfg.scheduler, 10, 2, lr=0.01)
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert group["lr"] == pytest.approx(0.01 * lr_factor(0, 10, cfg.scheduler.name, 0))
    # A plain tuple, not the config's list: checkpoints are read back with weights_only=True.
    assert group["betas"] == tuple(cfg.optimizer.betas)
    assert group["weight_decay"] == cfg.optimizer.weight_decay == 0.1


def test_state_dict_round_trip_continues_the_same_path():
    a, b = make_params(), make_params()
    opt_a = LARS(a, **HP)
    for step in range(2):
        for p, g in zip(a, grads_at(step), strict=True):
            p.grad = g.clone()
        opt_a.step()
    with torch.no_grad():
        for pb, pa in zip(b, a, strict=True):
            pb.copy_(pa)
    opt_b = LARS(b, lr=1.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as read from a checkpoint
    for params, opt in ((a, opt_a), (b, opt_b)):
        for p, g in zip(params, grads_at(2), strict=True):
            p.grad = g.clone()
        opt.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)


def test_closure_loss_is_returned_and_parameters_without_gradient_are_untouched():
    used, unused = make_params()[:2]
    opt = LARS([used, unused], lr=0.1)

    def closure():
        used.grad = torch.ones_like(used)
        return 1.5

    before = unused.detach().clone()
    assert opt.step(closure) == 1.5
    assert torch.equal(unused.detach(), before) and unused not in opt.state


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "weight_decay": -1e-6}, "weight_decay"),
        ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
    ],
)
def test_invalid_hyper_parameters_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LARS(make_params(), **kwargs)


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(4, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        LARS(emb.parameters(), lr=0.1).step()


# ----------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("option", ["lars", "adamw"])
def test_the_options_compose_and_pass_the_pretraining_check(option):
    check_pretrain(compose_config([f"optimizer={option}"]))


@pytest.mark.parametrize(
    "option,override,fragment",
    [
        ("lars", "optimizer.trust_coeficient=0.01", "trust_coeficient"),
        ("lars", "optimizer.trust_coefficient=high", "trust_coefficient"),
        ("adamw", "optimizer.beta=[0.9,0.95]", "beta"),
        ("adamw", "optimizer.betas=fast", "betas"),
    ],
)
def test_a_misspelt_key_or_a_wrong_type_is_refused(option, override, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        check_pretrain(with_values(compose_config([f"optimizer={option}"]), override))
    assert "\n" not in str(info.value)


def test_a_new_misspelt_key_on_the_command_line_is_refused():
    with pytest.raises(ConfigError, match="trust_coeficient"):
        check_pretrain(compose_config(["optimizer=lars", "+optimizer.trust_coeficient=0.01"]))


@pytest.mark.parametrize("option", ["lars", "adamw"])
def test_the_probe_refuses_pretraining_optimizers_in_one_line(option):
    cfg = compose_config(["checkpoint=raw", f"optimizer={option}"], config_name="probe")
    with pytest.raises(ConfigError, match="for pretraining only") as info:
        check_eval(cfg)
    assert "\n" not in str(info.value) and option in str(info.value)


def test_the_optimizer_comparison_refuses_them_too():
    cfg = compose_config(["checkpoint=raw", "+optimizer@optimizers.lars=lars"], "compare")
    with pytest.raises(ConfigError, match="lars .*for pretraining only"):
        check_eval(cfg)
