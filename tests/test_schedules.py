"""lr_factor: warm-up, cosine, step and constant learning-rate factors."""

from __future__ import annotations

import itertools
import math

import pytest

from moco.errors import ConfigError
from moco.optim.schedules import lr_factor


def test_linear_warmup_from_one_over_w_to_one():
    factors = [lr_factor(s, 100, "cosine", warmup_steps=4) for s in range(4)]
    assert factors == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Right after the warm-up the schedule itself starts, at its full value.
    assert lr_factor(4, 100, "cosine", warmup_steps=4) == pytest.approx(1.0)
    assert lr_factor(4, 100, "step", warmup_steps=4, milestones=[0.5]) == 1.0


@pytest.mark.parametrize("name", ["cosine", "step", "constant"])
def test_warmup_applies_to_every_schedule(name):
    assert lr_factor(0, 50, name, warmup_steps=10, milestones=[0.6]) == pytest.approx(0.1)
    assert lr_factor(4, 50, name, warmup_steps=10, milestones=[0.6]) == pytest.approx(0.5)


@pytest.mark.parametrize("warmup", [0, 10])
def test_cosine_from_one_to_zero_half_at_the_middle(warmup):
    total = 100 + warmup
    span = total - warmup  # 100: quarter and middle fall on whole steps
    assert lr_factor(warmup, total, "cosine", warmup) == pytest.approx(1.0)
    assert lr_factor(warmup + span // 2, total, "cosine", warmup) == pytest.approx(0.5)
    assert lr_factor(warmup + span // 4, total, "cosine", warmup) == pytest.approx(
        0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_factor(total - 1, total, "cosine", warmup) == pytest.approx(0.0, abs=1e-3)
    assert lr_factor(total, total, "cosine", warmup) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total + 5, total, "cosine", warmup) == pytest.approx(0.0, abs=1e-12)
    values = [lr_factor(s, total, "cosine", warmup) for s in range(warmup, total + 1)]
    assert all(b < a for a, b in itertools.pairwise(values))


def test_step_schedule_drops_by_gamma_at_fractions_of_training():
    total = 200  # MoCo v1: epochs 120 and 160 of 200
    f = [lr_factor(s, total, "step", milestones=[0.6, 0.8], gamma=0.1) for s in range(total)]
    assert f[0] == f[119] == 1.0
    assert f[120] == pytest.approx(0.1) and f[159] == pytest.approx(0.1)
    assert f[160] == pytest.approx(0.01) and f[199] == pytest.approx(0.01)
    assert lr_factor(50, 100, "step", milestones=[0.5], gamma=0.5) == pytest.approx(0.5)
    assert lr_factor(49, 100, "step", milestones=[0.5], gamma=0.5) == 1.0
    assert lr_factor(99, 100, "step", milestones=[], gamma=0.5) == 1.0


def test_constant():
    assert [lr_factor(s, 10, "constant") for s in (0, 5, 9, 10)] == [1.0] * 4


def test_unknown_schedule_raises_config_error():
    with pytest.raises(ConfigError, match="linear"):
        lr_factor(5, 10, "linear")


def test_unknown_schedule_raises_even_during_warmup():
    with pytest.raises(ConfigError):
        lr_factor(0, 10, "linear", warmup_steps=5)
