"""moco: Momentum Contrast self-supervised learning with PyTorch Lightning and Hydra."""

from moco.model import MoCo

__all__ = ["MoCo"]
