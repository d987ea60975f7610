"""moco: Momentum Contrast self-supervised learning with PyTorch Lightning and Hydra."""

__all__ = ["MoCo"]


def __getattr__(name: str):
    # moco.MoCo (the configs' _target_) is imported on first use, so that the parts that do not
    # train (moco.optim, moco.eval.results behind scripts/results_table.py) skip Lightning.
    if name == "MoCo":
        from moco.model import MoCo

        return MoCo
    raise AttributeError(f"module 'moco' has no attribute '{name}'")
