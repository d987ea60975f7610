"""Tests of moco.optim: the six update rules of docs OPTIMIZERS.md against hand-written rules,
against torch.optim where the documents say they agree or differ, and the Optimizer plumbing
(param groups, state_dict, schedulers, sparse gradients, validation)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

from moco.optim import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSProp
from moco.tools.optimizer_demo import bowl_1d, run_path, steps_to_reach, valley

DT = torch.float64
ATOL = 1e-12
SHAPES = [(3, 4), (5,)]


# ---------------------------------------------------------------------------------------------
# The rules written out by hand, one parameter at a time, exactly as in OPTIMIZERS.md.
# `g` already includes weight decay; `s` is the parameter's state dict; returns the new p.
# ---------------------------------------------------------------------------------------------
def ref_sgd(p, g, s, lr, hp):
    return p - lr * g


def ref_momentum(p, g, s, lr, hp):
    s["v"] = hp["momentum"] * s.get("v", torch.zeros_like(p)) + lr * g
    return p - s["v"]


def ref_nesterov(p, g, s, lr, hp):
    m = hp["momentum"]
    v_old = s.get("v", torch.zeros_like(p))
    s["v"] = m * v_old + lr * g
    return p + m * v_old - (1 + m) * s["v"]


def ref_adagrad(p, g, s, lr, hp):
    s["h"] = s.get("h", torch.zeros_like(p)) + g**2
    return p - lr * g / (torch.sqrt(s["h"]) + hp["eps"])


def ref_rmsprop(p, g, s, lr, hp):
    a = hp["alpha"]
    s["h"] = a * s.get("h", torch.zeros_like(p)) + (1 - a) * g**2
    if hp.get("eps_inside_sqrt", False):
        return p - lr * g / torch.sqrt(s["h"] + hp["eps"])
    return p - lr * g / (torch.sqrt(s["h"]) + hp["eps"])


def ref_adam(p, g, s, lr, hp):
    b1, b2 = hp["betas"]
    s["t"] = t = s.get("t", 0) + 1
    lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
    s["m"] = s.get("m", torch.zeros_like(p))
    s["v"] = s.get("v", torch.zeros_like(p))
    s["m"] = s["m"] + (1 - b1) * (g - s["m"])
    s["v"] = s["v"] + (1 - b2) * (g**2 - s["v"])
    return p - lr_t * s["m"] / (torch.sqrt(s["v"]) + hp["eps"])


# Non-default hyper-parameters (and a large eps) so that a mixed-up argument shows.
CASES = {
    "sgd": (SGD, {"lr": 0.1}, ref_sgd),
    "momentum": (Momentum, {"lr": 0.05, "momentum": 0.8}, ref_momentum),
    "nesterov": (Nesterov, {"lr": 0.05, "momentum": 0.7}, ref_nesterov),
    "adagrad": (AdaGrad, {"lr": 0.3, "eps": 1e-2}, ref_adagrad),
    "rmsprop": (RMSProp, {"lr": 0.02, "alpha": 0.9, "eps": 1e-2}, ref_rmsprop),
    "rmsprop_inside": (
        RMSProp,
        {"lr": 0.02, "alpha": 0.9, "eps": 1e-2, "eps_inside_sqrt": True},
        ref_rmsprop,
    ),
    "adam": (Adam, {"lr": 0.03, "betas": (0.8, 0.95), "eps": 1e-2}, ref_adam),
}
SIX = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]


def init_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=DT)) for s in SHAPES]


def quadratic_coefficients() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """f(p) = sum(a/2 * p^2 + b * p), a > 0: gradient a * p + b."""
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.rand(s, generator=gen, dtype=DT) * 3 + 0.2, torch.randn(s, generator=gen, dtype=DT))
        for s in SHAPES
    ]


def random_grads(step: int, scale: float = 1.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [scale * torch.randn(s, generator=gen, dtype=DT) for s in SHAPES]


def set_grads(params, source: str, step: int) -> None:
    """Fill p.grad: by backward of the quadratic, or with random gradients."""
    for p in params:
        p.grad = None
    if source == "quadratic":
        loss = sum(
            (a / 2 * p**2 + b * p).sum()
            for p, (a, b) in zip(params, quadratic_coefficients(), strict=True)
        )
        loss.backward()
    else:
        for p, g in zip(params, random_grads(step), strict=True):
            p.grad = g.clone()


def hand_grads(ps, source: str, step: int) -> list[torch.Tensor]:
    if source == "quadratic":
        return [a * p + b for p, (a, b) in zip(ps, quadratic_coefficients(), strict=True)]
    return random_grads(step)


def param_settings(config: str, hyper: dict) -> list[tuple[float, float]]:
    """(lr, weight_decay) of each parameter in the configuration."""
    if config == "plain":
        return [(hyper["lr"], 0.0)] * len(SHAPES)
    return [(hyper["lr"], 0.01), (hyper["lr"] * 0.3, 0.05)]


def build(name: str, config: str, params):
    cls, hyper, _ = CASES[name]
    if config == "plain":
        return cls(params, **hyper)
    (_, wd0), (lr1, wd1) = param_settings(config, hyper)
    groups = [{"params": [params[0]]}, {"params": [params[1]], "lr": lr1, "weight_decay": wd1}]
    return cls(groups, **{**hyper, "weight_decay": wd0})


def run_ours(name, source, config, steps, lr_factor=None, scheduler_cls=None):
    params = init_params()
    opt = build(name, config, params)
    sched = None
    if lr_factor is not None:
        sched = LambdaLR(opt, lr_factor)
    elif scheduler_cls is not None:
        sched = scheduler_cls(opt)
    for k in range(steps):
        set_grads(params, source, k)
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach() for p in params], opt


def run_hand(name, source, config, steps, lr_at=None):
    """The hand-written rule; `lr_at(k, base_lr)` gives the lr of step k (default constant)."""
    _, hyper, rule = CASES[name]
    ps = [p.detach().clone() for p in init_params()]
    settings = param_settings(config, hyper)
    states = [{} for _ in ps]
    for k in range(steps):
        grads = hand_grads(ps, source, k)
        for i, ((lr, wd), g) in enumerate(zip(settings, grads, strict=True)):
            lr_k = lr if lr_at is None else lr_at(k, lr)
            ps[i] = rule(ps[i], g + wd * ps[i], states[i], lr_k, hyper)
    return ps


def assert_close_lists(xs, ys, atol=ATOL):
    for x, y in zip(xs, ys, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Each rule, step by step, equals its hand-written formula.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["plain", "two_groups_weight_decay"])
@pytest.mark.parametrize("source", ["quadratic", "random"])
@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_hand_formula_step_by_step(name, source, config):
    for steps in (1, 2, 6):
        ours, _ = run_ours(name, source, config, steps)
        assert_close_lists(ours, run_hand(name, source, config, steps))
    # the optimizer actually moved the parameters
    assert not torch.allclose(ours[0], init_params()[0].detach())


@pytest.mark.parametrize("name", SIX)
def test_weight_decay_changes_the_path(name):
    """Guards the previous test: weight decay is not silently ignored."""
    with_wd, _ = run_ours(name, "random", "two_groups_weight_decay", 3)
    hand_without = run_hand(name, "random", "plain", 3)
    assert (with_wd[0] - hand_without[0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", SIX)
def test_parameters_without_grad_are_skipped(name):
    cls, hyper, _ = CASES[name]
    params = init_params()
    frozen = torch.nn.Parameter(torch.ones(4, dtype=DT))
    opt = cls([*params, frozen], **hyper)
    for k in range(3):
        set_grads(params, "random", k)
        opt.step()
    assert torch.equal(frozen.detach(), torch.ones(4, dtype=DT))
    assert len(opt.state[frozen]) == 0
    assert_close_lists([p.detach() for p in params], run_hand(name, "random", "plain", 3))


@pytest.mark.parametrize("name", SIX)
def test_closure_loss_is_returned_and_state_is_float64(name):
    cls, hyper, _ = CASES[name]
    params = init_params()
    opt = cls(params, **hyper)

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    expected = float(sum((p.detach() ** 2).sum() for p in params))
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-15)
    assert opt.step() is None
    for p in params:
        assert p.dtype == DT
        for value in opt.state[p].values():
            if torch.is_tensor(value):
                assert value.dtype == DT and value.shape == p.shape


@pytest.mark.parametrize("name", SIX)
def test_mixed_dtypes_in_one_group(name):
    """A float32 and a float64 parameter in one group each follow their own rule."""
    cls, hyper, _ = CASES[name]
    gen = torch.Generator().manual_seed(3)
    p32 = torch.nn.Parameter(torch.randn(6, generator=gen))
    p64 = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=DT))
    alone = [torch.nn.Parameter(p32.detach().clone()), torch.nn.Parameter(p64.detach().clone())]
    opt = cls([p32, p64], **hyper)
    opts_alone = [cls([q], **hyper) for q in alone]
    for _ in range(3):
        for p, q, o in zip((p32, p64), alone, opts_alone, strict=True):
            p.grad = torch.sin(3 * p.detach()) + 0.5
            q.grad = torch.sin(3 * q.detach()) + 0.5
            o.step()
        opt.step()
    assert p32.dtype == torch.float32 and p64.dtype == DT
    assert torch.equal(p32.detach(), alone[0].detach())
    assert torch.equal(p64.detach(), alone[1].detach())


def test_adam_step_count_is_per_parameter():
    """A parameter without a gradient at some step does not advance its t."""
    hyper = CASES["adam"][1]
    params = init_params()
    opt = Adam(params, **hyper)
    ps = [p.detach().clone() for p in params]
    states = [{}, {}]
    for k in range(4):
        grads = random_grads(k)
        params[0].grad = grads[0].clone()
        params[1].grad = None if k == 1 else grads[1].clone()
        opt.step()
        for i in range(2):
            if i == 1 and k == 1:
                continue
            ps[i] = ref_adam(ps[i], grads[i], states[i], hyper["lr"], hyper)
    assert opt.state[params[0]]["step"] == 4
    assert opt.state[params[1]]["step"] == 3
    assert_close_lists([p.detach() for p in params], ps)


# ---------------------------------------------------------------------------------------------
# Momentum and Nesterov against torch.optim.SGD and the document's look-ahead sequence.
# ---------------------------------------------------------------------------------------------
def torch_sgd_path(params, source, steps, lr_factor=None, **kwargs):
    opt = torch.optim.SGD(params, foreach=True, **kwargs)
    sched = LambdaLR(opt, lr_factor) if lr_factor is not None else None
    for k in range(steps):
        set_grads(params, source, k)
        opt.step()
        if sched is not None:
            sched.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("source", ["quadratic", "random"])
def test_momentum_equals_torch_sgd_with_constant_lr(source):
    ours, _ = run_ours("momentum", source, "plain", 10)
    theirs = torch_sgd_path(init_params(), source, 10, lr=0.05, momentum=0.8)
    assert_close_lists(ours, theirs)


def test_momentum_keeps_old_lr_in_velocity_when_lr_changes():
    m, lr, steps = 0.8, 0.05, 10

    def halve_after_four(k):
        return 1.0 if k < 4 else 0.5

    ours, opt = run_ours("momentum", "random", "plain", steps, lr_factor=halve_after_four)
    theirs = torch_sgd_path(
        init_params(), "random", steps, lr_factor=halve_after_four, lr=lr, momentum=m
    )
    # the paths differ once lr has changed ...
    assert max((a - b).abs().max() for a, b in zip(ours, theirs, strict=True)) > 1e-3
    # ... because v = sum_k m^(t-k) lr_k g_k keeps the lr of each step (gradients here do not
    # depend on p), while torch's buffer sum_k m^(t-k) g_k is multiplied by the current lr.
    lrs = [lr * halve_after_four(k) for k in range(steps)]
    grads = [random_grads(k) for k in range(steps)]
    p0 = [p.detach() for p in init_params()]
    for i, p in enumerate(init_params()):
        v_hand = sum(m ** (steps - 1 - k) * lrs[k] * grads[k][i] for k in range(steps))
        v = opt.state[opt.param_groups[0]["params"][i]]["velocity"]
        torch.testing.assert_close(v, v_hand, atol=ATOL, rtol=0)
        buffers = [sum(m ** (t - k) * grads[k][i] for k in range(t + 1)) for t in range(steps)]
        torch.testing.assert_close(
            theirs[i], p0[i] - sum(lrs[t] * buffers[t] for t in range(steps)), atol=ATOL, rtol=0
        )
        assert p.shape == v.shape


def test_nesterov_follows_the_documents_look_ahead_sequence():
    """theta_ahead = theta - m v; g = grad J(theta_ahead); v <- m v + lr g; theta <- theta - v.
    Our parameters must be the look-ahead point theta - m v after every step."""
    m, lr = 0.9, 0.1
    theta = torch.tensor([-7.0, 2.0], dtype=DT)
    v = torch.zeros(2, dtype=DT)

    def grad_valley(x):  # J(x, y) = x^2/20 + y^2
        return torch.stack([x[0] / 10, 2 * x[1]])

    param = torch.nn.Parameter(theta.clone())
    opt = Nesterov([param], lr=lr, momentum=m)
    momentum_path = run_path(Momentum, valley, [-7.0, 2.0], 20, lr=lr, momentum=m)
    for _ in range(20):
        g = grad_valley(theta - m * v)
        v = m * v + lr * g
        theta = theta - v
        opt.zero_grad()
        valley(param).backward()
        opt.step()
        torch.testing.assert_close(param.detach(), theta - m * v, atol=ATOL, rtol=0)
    # and it is not plain momentum
    assert (momentum_path[-1] - param.detach()).abs().max() > 1e-2


@pytest.mark.parametrize("source", ["quadratic", "random"])
def test_nesterov_equals_torch_sgd_nesterov_with_constant_lr(source):
    ours, _ = run_ours("nesterov", source, "plain", 10)
    theirs = torch_sgd_path(init_params(), source, 10, lr=0.05, momentum=0.7, nesterov=True)
    assert_close_lists(ours, theirs)


def test_momentum_step_tends_to_lr_g_over_one_minus_momentum():
    lr, m = 0.1, 0.9
    g = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    p = torch.nn.Parameter(torch.zeros(3, dtype=DT))
    opt = Momentum([p], lr=lr, momentum=m)
    steps = []
    for _ in range(300):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        steps.append(before - p.detach())
    torch.testing.assert_close(steps[0], lr * g, atol=ATOL, rtol=0)  # first step: plain
    torch.testing.assert_close(steps[-1], lr * g / (1 - m), atol=1e-10, rtol=1e-10)  # 10x
    assert (steps[9] - lr * g / (1 - m)).abs().max() > 0.1  # not there after 10 steps


# ---------------------------------------------------------------------------------------------
# RMSProp and Adam against torch.optim: where eps enters.
# ---------------------------------------------------------------------------------------------
def run_single(opt_factory, grads, start):
    p = torch.nn.Parameter(start.clone())
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_rmsprop_eps_outside_sqrt_equals_torch_rmsprop_with_same_eps():
    grads = [g[0] for g in (random_grads(k) for k in range(8))]
    start = torch.zeros(SHAPES[0], dtype=DT)
    for scale in (1.0, 1e-6):
        gs = [scale * g for g in grads]
        ours = run_single(lambda ps: RMSProp(ps, lr=0.01, alpha=0.9, eps=1e-8), gs, start)
        theirs = run_single(
            lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-8), gs, start
        )
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_rmsprop_eps_inside_sqrt_differs_from_torch_on_tiny_gradients():
    lr, alpha, eps = 0.01, 0.9, 1e-8
    g = torch.full((4,), 1e-6, dtype=DT)
    start = torch.zeros(4, dtype=DT)
    inside = run_single(lambda ps: RMSProp(ps, lr, alpha, eps, eps_inside_sqrt=True), [g], start)
    theirs = run_single(lambda ps: torch.optim.RMSprop(ps, lr, alpha=alpha, eps=eps), [g], start)
    h = (1 - alpha) * g**2  # 1e-13, much smaller than eps = 1e-8
    torch.testing.assert_close(inside, -lr * g / torch.sqrt(h + eps), atol=ATOL, rtol=0)
    torch.testing.assert_close(theirs, -lr * g / (torch.sqrt(h) + eps), atol=ATOL, rtol=0)
    # sqrt(h + eps) ~ 1e-4 dominates: the step is ~300x smaller than torch's (~lr / sqrt(0.1))
    assert (theirs / inside).min() > 100
    # ordinary gradients: eps is negligible either way
    big = [g[0] for g in (random_grads(k) for k in range(8))]
    z = torch.zeros(SHAPES[0], dtype=DT)
    ours_big = run_single(lambda ps: RMSProp(ps, lr, alpha, eps, eps_inside_sqrt=True), big, z)
    theirs_big = run_single(lambda ps: torch.optim.RMSprop(ps, lr, alpha=alpha, eps=eps), big, z)
    torch.testing.assert_close(ours_big, theirs_big, atol=1e-8, rtol=1e-6)


def test_adam_differs_from_torch_adam_on_tiny_gradients_only():
    lr, betas, eps, steps = 0.01, (0.9, 0.999), 1e-7, 5
    g = torch.full((3,), 2e-7, dtype=DT)  # constant and tiny: comparable to eps
    start = torch.zeros(3, dtype=DT)
    ours = run_single(lambda ps: Adam(ps, lr, betas, eps), [g] * steps, start)
    theirs = run_single(lambda ps: torch.optim.Adam(ps, lr, betas, eps=eps), [g] * steps, start)
    # With a constant g both bias-corrected averages are exact: m_hat = g, sqrt(v_hat) = g.
    # torch adds eps to sqrt(v_hat); ours adds it to sqrt(v) = sqrt(1 - b2^t) g, which is
    # torch's rule with eps / sqrt(1 - b2^t) (31x larger at t = 1) in place of eps.
    ts = range(1, steps + 1)
    torch.testing.assert_close(theirs, -sum(lr * g / (g + eps) for t in ts), atol=ATOL, rtol=0)
    ours_hand = -sum(lr * g / (g + eps / math.sqrt(1 - betas[1] ** t)) for t in ts)
    torch.testing.assert_close(ours, ours_hand, atol=ATOL, rtol=0)
    assert (theirs / ours).min() > 3  # torch moves more than 3x as far
    # one step of ours is exactly torch's with eps / sqrt(1 - b2), also for random gradients
    tiny = [random_grads(0)[0] * 1e-7]
    z = torch.zeros(SHAPES[0], dtype=DT)
    one = run_single(lambda ps: Adam(ps, lr, betas, eps), tiny, z)
    torch_eff = run_single(
        lambda ps: torch.optim.Adam(ps, lr, betas, eps=eps / math.sqrt(1 - betas[1])), tiny, z
    )
    torch.testing.assert_close(one, torch_eff, atol=1e-15, rtol=1e-10)
    assert (
        one - run_single(lambda ps: torch.optim.Adam(ps, lr, betas, eps=eps), tiny, z)
    ).abs().max() > 1e-4
    # ordinary gradients: close, but not identical
    ours_q, _ = run_ours("adam", "quadratic", "plain", 20)
    params = init_params()
    opt = torch.optim.Adam(params, lr=0.03, betas=(0.8, 0.95), eps=1e-2)
    for k in range(20):
        set_grads(params, "quadratic", k)
        opt.step()
    diff = max((a - b.detach()).abs().max() for a, b in zip(ours_q, params, strict=True))
    assert 0 < diff < 0.05  # eps = 1e-2 here; with eps = 1e-7 below the gap is ~1e-6
    z = torch.zeros(SHAPES[0], dtype=DT)
    normal = [g[0] for g in (random_grads(k) for k in range(20))]
    ours_n = run_single(lambda ps: Adam(ps, lr, betas, eps), normal, z)
    theirs_n = run_single(lambda ps: torch.optim.Adam(ps, lr, betas, eps=eps), normal, z)
    gap = (ours_n - theirs_n).abs().max()
    assert 0 < gap < 1e-5


# ---------------------------------------------------------------------------------------------
# Optimizer plumbing: state_dict, schedulers, sparse gradients, validation.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SIX)
def test_state_dict_round_trip(name):
    params = init_params()
    opt = build(name, "two_groups_weight_decay", params)
    for k in range(3):
        set_grads(params, "quadratic", k)
        opt.step()
    opt.param_groups[0]["lr"] *= 0.5  # as a scheduler would
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = build(name, "two_groups_weight_decay", copies)
    restored.load_state_dict(saved)
    fresh_copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = build(name, "two_groups_weight_decay", fresh_copies)  # control: no state loaded
    for k in range(3, 7):
        for ps, o in ((params, opt), (copies, restored), (fresh_copies, fresh)):
            set_grads(ps, "quadratic", k)
            o.step()
    for p, q in zip(params, copies, strict=True):
        assert torch.equal(p.detach(), q.detach())
    assert not torch.equal(params[0].detach(), fresh_copies[0].detach())
    for q in copies:
        for value in restored.state[q].values():
            if torch.is_tensor(value):
                assert value.dtype == DT


@pytest.mark.parametrize("name", SIX)
def test_lambda_lr_drives_each_optimizer(name):
    def factor(k):
        return 0.7**k

    ours, opt = run_ours(name, "quadratic", "two_groups_weight_decay", 6, lr_factor=factor)
    hand = run_hand(
        name, "quadratic", "two_groups_weight_decay", 6, lr_at=lambda k, lr: lr * factor(k)
    )
    assert_close_lists(ours, hand)
    base = CASES[name][1]["lr"]
    assert opt.param_groups[0]["lr"] == pytest.approx(base * 0.7**6)
    constant = run_hand(name, "quadratic", "two_groups_weight_decay", 6)
    assert (ours[0] - constant[0]).abs().max() > 1e-6


@pytest.mark.parametrize("name", SIX)
def test_cosine_annealing_drives_each_optimizer(name):
    t_max = 5

    def cosine(k, lr):
        return lr * (1 + math.cos(math.pi * k / t_max)) / 2

    ours, opt = run_ours(
        name,
        "random",
        "two_groups_weight_decay",
        5,
        scheduler_cls=lambda o: CosineAnnealingLR(o, t_max),
    )
    assert_close_lists(ours, run_hand(name, "random", "two_groups_weight_decay", 5, lr_at=cosine))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("name", SIX)
def test_sparse_gradients_are_refused(name):
    cls, hyper, _ = CASES[name]
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = cls(embedding.parameters(), **hyper)
    embedding(torch.tensor([1, 2, 2])).sum().backward()
    assert embedding.weight.grad.is_sparse
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    dense = torch.nn.Embedding(10, 3, sparse=False)
    opt = cls(dense.parameters(), **hyper)
    dense(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()  # dense gradients are fine


INVALID = [
    (SGD, {"lr": -0.1}, "lr"),
    (SGD, {"lr": 0.1, "weight_decay": -1e-4}, "weight_decay"),
    (SGD, {"lr": float("nan")}, "lr"),
    (Momentum, {"lr": -1.0}, "lr"),
    (Momentum, {"lr": 0.1, "momentum": 1.0}, "momentum"),
    (Momentum, {"lr": 0.1, "momentum": -0.1}, "momentum"),
    (Nesterov, {"lr": 0.1, "momentum": 1.5}, "momentum"),
    (Nesterov, {"lr": -0.1}, "lr"),
    (AdaGrad, {"lr": 0.1, "eps": 0.0}, "eps"),
    (AdaGrad, {"lr": -0.1}, "lr"),
    (RMSProp, {"lr": 0.1, "alpha": 1.0}, "alpha"),
    (RMSProp, {"lr": 0.1, "alpha": -0.5}, "alpha"),
    (RMSProp, {"lr": 0.1, "eps": -1e-7}, "eps"),
    (Adam, {"lr": -1e-3}, "lr"),
    (Adam, {"betas": (1.0, 0.999)}, "beta1"),
    (Adam, {"betas": (0.9, 1.0)}, "beta2"),
    (Adam, {"betas": (-0.1, 0.999)}, "beta1"),
    (Adam, {"betas": (0.9,)}, "betas"),
    (Adam, {"eps": 0.0}, "eps"),
    (Adam, {"weight_decay": -0.1}, "weight_decay"),
]


@pytest.mark.parametrize(("cls", "kwargs", "word"), INVALID)
def test_invalid_hyper_parameters_raise_value_error(cls, kwargs, word):
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=word):
        cls([p], **kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (SGD, {"lr": 0.0}),
        (Momentum, {"lr": 0.1, "momentum": 0.0}),
        (Nesterov, {"lr": 0.1, "momentum": 0.99}),
        (AdaGrad, {"lr": 0.1, "eps": 1e-12}),
        (RMSProp, {"lr": 0.1, "alpha": 0.0, "eps_inside_sqrt": True}),
        (Adam, {"betas": [0.0, 0.0], "weight_decay": 0.0}),
    ],
)
def test_boundary_hyper_parameters_are_accepted(cls, kwargs):
    p = torch.nn.Parameter(torch.ones(2))
    opt = cls([p], **kwargs)
    p.grad = torch.ones(2)
    opt.step()
    assert torch.isfinite(p).all()


# ---------------------------------------------------------------------------------------------
# The documents' demonstrations (scripts/optimizer_demo.py).
# ---------------------------------------------------------------------------------------------
def test_run_path_records_the_sgd_closed_form():
    path = run_path(SGD, bowl_1d, [2.0], 10, lr=0.03)  # x <- x - 0.03 * 8x = 0.76 x
    expected = 2.0 * 0.76 ** torch.arange(11, dtype=DT)
    torch.testing.assert_close(path[:, 0], expected, atol=ATOL, rtol=0)
    assert steps_to_reach(bowl_1d, path, 1e-3) is None
    assert steps_to_reach(bowl_1d, run_path(SGD, bowl_1d, [2.0], 30, lr=0.03), 1e-3) == 18


def test_momentum_1d_oscillates_and_passes_the_minimum_first():
    """f(x) = 4 x^2 from 2: Momentum (lr 0.01, m 0.9) against SGD (lr 0.03).

    Momentum overshoots and oscillates; it reaches (passes) x = 0 at step 6, which SGD
    never does. In these settings, though, SGD gets below f = 1e-3 first (step 18 against
    60): the oscillation decays like sqrt(0.9)^t while SGD contracts by 0.76 per step.
    """
    mom = run_path(Momentum, bowl_1d, [2.0], 200, lr=0.01, momentum=0.9)[:, 0]
    sgd = run_path(SGD, bowl_1d, [2.0], 200, lr=0.03)[:, 0]
    mom_crossings = torch.nonzero(torch.sign(mom[1:]) != torch.sign(mom[:-1])).flatten() + 1
    assert int(mom_crossings[0]) == 6
    assert len(mom_crossings) >= 5  # oscillates
    assert (sgd > 0).all()  # plain descent never passes the minimum
    assert steps_to_reach(bowl_1d, run_path(Momentum, bowl_1d, [2.0], 200, lr=0.01), 1e-3) == 60
    assert int(mom_crossings[0]) < steps_to_reach(bowl_1d, sgd.unsqueeze(1), 1e-3) == 18


def test_valley_paths_behave_as_the_documents_say():
    start = [-7.0, 2.0]
    sgd = run_path(SGD, valley, start, 30, lr=0.95)
    momentum = run_path(Momentum, valley, start, 30, lr=0.1, momentum=0.9)
    adagrad = run_path(AdaGrad, valley, start, 30, lr=1.5)

    def sign_changes(y):
        return int((torch.sign(y[1:]) != torch.sign(y[:-1])).sum())

    assert sign_changes(sgd[:, 1]) == 30  # SGD zig-zags across the valley at every step
    assert sign_changes(momentum[:, 1]) < 10  # Momentum rolls
    assert sign_changes(adagrad[:, 1]) == 0  # AdaGrad goes nearly straight
    assert (adagrad[1:, 0] > adagrad[:-1, 0]).all()  # ... steadily towards x = 0
    for cls, hyper in [
        (SGD, {"lr": 0.95}),
        (Momentum, {"lr": 0.1}),
        (Nesterov, {"lr": 0.1}),
        (AdaGrad, {"lr": 1.5}),
        (RMSProp, {"lr": 0.1}),
        (Adam, {"lr": 0.3}),
    ]:
        path = run_path(cls, valley, start, 100, **hyper)
        assert steps_to_reach(valley, path, 1e-3) is not None, cls.__name__
