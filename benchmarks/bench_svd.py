"""Factored SVD of B @ A (batch of same-shape modules) against one dense torch.linalg.svd of ΔW.

    python benchmarks/bench_svd.py [--device auto|cpu|cuda] [--m 4096 --n 4096 --r 32 --batch 8]

The dense SVD is what PEFT's `add_weighted_adapter(combination_type="svd")` runs per layer; it is
timed once (one 4096 x 4096 SVD takes tens of seconds on a CPU). The factored SVD is timed as the
median of `--repeats` calls after one warm-up call, for the whole batch.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from adaptools.device import resolve_device
from timing import timed
from adaptools.linalg import factored_svd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--r", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    B = torch.randn(args.batch, args.m, args.r, generator=g).to(device)
    A = torch.randn(args.batch, args.r, args.n, generator=g).to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"shapes: B ({args.batch}, {args.m}, {args.r}), A ({args.batch}, {args.r}, {args.n})")

    factored_svd(B, A, device=device)  # warm-up (kernel / library initialisation)
    times = []
    for _ in range(args.repeats):
        t, fact = timed(lambda: factored_svd(B, A, device=device), device)
        times.append(t)
    t_batch = statistics.median(times)
    print(f"factored SVD, batch of {args.batch}: {t_batch * 1e3:.2f} ms "
          f"(median of {args.repeats}), {t_batch / args.batch * 1e3:.2f} ms per module")

    torch.linalg.svd(torch.randn(64, 64, device=device), full_matrices=False)  # initialise the solver
    dW = B[0] @ A[0]
    t_dense, (U, S, Vh) = timed(lambda: torch.linalg.svd(dW, full_matrices=False), device)
    print(f"dense torch.linalg.svd of one {args.m}x{args.n} ΔW (timed once): {t_dense:.2f} s")

    k = min(args.m, args.n, args.r)
    err = float(((fact.S[0, :k] - S[:k]).abs() / S[:k]).max())
    print(f"max relative difference of the top {k} singular values: {err:.2e}")
    print(f"ratio dense / factored per module: {t_dense / (t_batch / args.batch):.0f}x; "
          f"dense one / factored batch of {args.batch}: {t_dense / t_batch:.0f}x")


if __name__ == "__main__":
    main()
