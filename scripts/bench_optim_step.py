"""Time one optimizer step: moco.optim.Momentum against torch.optim.SGD(momentum=0.9).

Both run on the parameters of a torchvision ResNet-18 with fixed random gradients, in the
same process; each is warmed up, then the median of ``--steps`` timed steps is reported.

    python scripts/bench_optim_step.py [--steps 50] [--warmup 10] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from moco.optim import Momentum


def median_step_seconds(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def resnet18_params_with_grads(seed: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(seed)
    params = list(torchvision.models.resnet18().parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ours_params = resnet18_params_with_grads(0)
    torch_params = resnet18_params_with_grads(0)
    n = sum(p.numel() for p in ours_params)
    ours = Momentum(ours_params, lr=0.03, momentum=0.9, weight_decay=1e-4)
    theirs = torch.optim.SGD(torch_params, lr=0.03, momentum=0.9, weight_decay=1e-4, foreach=True)

    # interleave the two measurements so that machine noise hits both alike
    t_ours, t_torch = [], []
    for _ in range(3):
        t_ours.append(median_step_seconds(ours, args.steps, args.warmup))
        t_torch.append(median_step_seconds(theirs, args.steps, args.warmup))
    ours_s, torch_s = min(t_ours), min(t_torch)
    print(
        f"ResNet-18: {len(ours_params)} tensors, {n / 1e6:.2f} M parameters, float32, CPU, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps (best of 3 rounds)"
    )
    print(f"moco.optim.Momentum                     : {ours_s * 1e3:8.3f} ms/step")
    print(f"torch.optim.SGD(momentum=0.9, foreach)  : {torch_s * 1e3:8.3f} ms/step")
    print(f"ratio ours / torch                      : {ours_s / torch_s:8.3f}")


if __name__ == "__main__":
    main()
