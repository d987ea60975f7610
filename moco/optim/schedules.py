"""Learning-rate schedules as multiplicative factors of the base lr, stepped every iteration."""

import math
from collections.abc import Sequence

from moco.errors import ConfigError

SCHEDULES = ("cosine", "step", "constant")


def lr_factor(
    step: int,
    total_steps: int,
    name: str,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (),
    gamma: float = 0.1,
) -> float:
    """Factor applied to the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps, then:
    - cosine: half a cosine from 1 to 0 over the remaining steps (MoCo v2);
    - step: multiply by ``gamma`` at each milestone, given as a fraction of training (MoCo v1
      drops 10x at epochs 120 and 160 of 200, i.e. milestones 0.6 and 0.8);
    - constant: 1.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown scheduler '{name}': choose one of {list(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        progress = min((step - warmup_steps) / span, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        passed = sum(step >= m * total_steps for m in milestones)
        return gamma**passed
    return 1.0  # constant
