"""Does the torch thread count change training numerics on this machine? A few SGD steps, twice per count.

    python benchmarks/thread_determinism.py [--steps 3]

Trains `resnet_tiny` (width 16, CIFAR stem) on a fixed random batch of 64 32-px images for --steps steps with
1 thread and with 2 threads, twice each, and prints the largest weight difference between the runs: 0 for the
same thread count means CPU training is deterministic at a fixed thread count; the 1-vs-2 difference is what
a different count (a local run vs `ray job submit`) starts from. docs/reproducibility.md uses it.
"""

from __future__ import annotations

import argparse

import torch

from cf_ray.config import ModelConfig
from cf_ray.models.checkpoint import build


def weights_after(threads: int, steps: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build(ModelConfig(arch="resnet_tiny", width=16, stem="cifar"))
    x = torch.randn(64, 3, 32, 32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(steps):
        out = net(x)
        out = out if isinstance(out, torch.Tensor) else list(out.values())[-1] if isinstance(out, dict) else out[-1]
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    one, one_again = weights_after(1, args.steps), weights_after(1, args.steps)
    two, two_again = weights_after(2, args.steps), weights_after(2, args.steps)
    print(f"after {args.steps} SGD steps, largest weight difference:")
    print(f"  1 thread vs 1 thread:   {(one - one_again).abs().max().item():.3g}")
    print(f"  2 threads vs 2 threads: {(two - two_again).abs().max().item():.3g}")
    print(f"  1 thread vs 2 threads:  {(one - two).abs().max().item():.3g}")


if __name__ == "__main__":
    main()
