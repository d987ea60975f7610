"""Draw the source documents' optimizer demonstrations with ``moco.optim``.

Writes two figures to ``--out-dir`` (default ``docs/figures``):

* ``optimizer_paths.png``: the six optimizers on f(x, y) = x^2/20 + y^2 from (-7, 2),
  over the contour plot, one subplot each;
* ``momentum_1d.png``: f(x) = 4 x^2 from x = 2, x over the iterations for Momentum
  (lr 0.01, momentum 0.9) against plain SGD (lr 0.03);

and prints, for each optimizer, the number of steps to reach f < 1e-3 on the 2-D function.

    python scripts/optimizer_demo.py [--out-dir docs/figures] [--steps 30] [--max-steps 500]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moco.optim import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSProp  # noqa: E402
from moco.tools.optimizer_demo import bowl_1d, run_path, steps_to_reach, valley  # noqa: E402

START_2D = (-7.0, 2.0)
THRESHOLD = 1e-3

# (class, hyper-parameters): learning rates in the spirit of the classic textbook picture.
SETTINGS_2D = [
    (SGD, {"lr": 0.95}),
    (Momentum, {"lr": 0.1, "momentum": 0.9}),
    (Nesterov, {"lr": 0.1, "momentum": 0.9}),
    (AdaGrad, {"lr": 1.5}),
    (RMSProp, {"lr": 0.1, "alpha": 0.99}),
    (Adam, {"lr": 0.3}),
]
SETTINGS_1D = [
    (Momentum, {"lr": 0.01, "momentum": 0.9}),
    (SGD, {"lr": 0.03}),
]


def describe(cls: type, hyper: dict) -> str:
    return f"{cls.__name__} (" + ", ".join(f"{k}={v}" for k, v in hyper.items()) + ")"


def plot_paths(out: Path, steps: int) -> None:
    xs, ys = np.meshgrid(np.linspace(-10, 10, 300), np.linspace(-5, 5, 300))
    zs = xs**2 / 20.0 + ys**2
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), sharex=True, sharey=True)
    for ax, (cls, hyper) in zip(axes.flat, SETTINGS_2D, strict=True):
        path = run_path(cls, valley, START_2D, steps, **hyper).numpy()
        ax.contour(xs, ys, zs, levels=np.geomspace(0.05, 30, 12), colors="0.75", linewidths=0.8)
        ax.plot(path[:, 0], path[:, 1], "o-", color="tab:red", markersize=3, linewidth=1.2)
        ax.plot(0, 0, "+", color="black", markersize=12)
        ax.set_title(describe(cls, hyper), fontsize=10)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-5, 5)
    for ax in axes[1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    fig.suptitle(f"f(x, y) = x²/20 + y² from (-7, 2): {steps} steps of each optimizer")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_momentum_1d(out: Path, steps: int) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for cls, hyper in SETTINGS_1D:
        path = run_path(cls, bowl_1d, [2.0], steps, **hyper)[:, 0].numpy()
        reached = steps_to_reach(bowl_1d, run_path(cls, bowl_1d, [2.0], 1000, **hyper), THRESHOLD)
        crossings = np.nonzero(np.sign(path[1:]) != np.sign(path[:-1]))[0]
        crossed = f"step {crossings[0] + 1}" if len(crossings) else "never"
        label = (
            f"{describe(cls, hyper)}: passes x = 0: {crossed}; "
            f"f < {THRESHOLD:g} first at step {reached}"
        )
        ax.plot(np.arange(len(path)), path, "o-", markersize=3, label=label)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("iteration")
    ax.set_ylabel("x")
    ax.set_title("f(x) = 4x² from x = 2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def print_table(max_steps: int) -> None:
    print(f"Steps to reach f < {THRESHOLD:g} on f(x, y) = x^2/20 + y^2 from {START_2D}:")
    print(f"| {'optimizer':<40} | steps |")
    print(f"|{'-' * 42}|-------|")
    for cls, hyper in SETTINGS_2D:
        reached = steps_to_reach(valley, run_path(cls, valley, START_2D, max_steps, **hyper), 1e-3)
        text = str(reached) if reached is not None else f"not within {max_steps} steps"
        print(f"| {describe(cls, hyper):<40} | {text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("docs/figures"))
    parser.add_argument("--steps", type=int, default=30, help="steps drawn in the 2-D figure")
    parser.add_argument("--steps-1d", type=int, default=100, help="steps drawn in the 1-D figure")
    parser.add_argument("--max-steps", type=int, default=500, help="step budget of the table")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot_paths(args.out_dir / "optimizer_paths.png", args.steps)
    plot_momentum_1d(args.out_dir / "momentum_1d.png", args.steps_1d)
    print_table(args.max_steps)
    print(f"figures written to {args.out_dir}/optimizer_paths.png and momentum_1d.png")


if __name__ == "__main__":
    main()
