"""moco: Momentum Contrast self-supervised learning with PyTorch Lightning and Hydra."""

from moco.launch import register_resolvers
from moco.model import MoCo

# conf/ refers to the launcher's numbers (${moco.run_stamp:} and friends); any import of the
# package makes them resolvable, before Hydra composes a config.
register_resolvers()

__all__ = ["MoCo"]
