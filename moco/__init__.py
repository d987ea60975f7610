"""moco: Momentum Contrast self-supervised learning with PyTorch Lightning and Hydra."""

__all__ = ["MoCo", "MoCoV3", "load_backbone"]


def __getattr__(name: str):
    # moco.MoCo (the configs' _target_) is imported on first use, so that the parts that do not
    # train (moco.optim, moco.eval.results behind scripts/results_table.py) skip Lightning.
    if name == "MoCo":
        from moco.model import MoCo

        return MoCo
    if name == "MoCoV3":
        from moco.model_v3 import MoCoV3

        return MoCoV3
    if name == "load_backbone":  # the frozen backbone of any MoCo checkpoint (moco/weights.py)
        from moco.weights import load_backbone

        return load_backbone
    raise AttributeError(f"module 'moco' has no attribute '{name}'")
