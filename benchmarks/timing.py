"""Timing shared by the benchmark scripts (run as `python benchmarks/bench_x.py`, so this imports as `timing`)."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[float, T]:
    """(seconds, result) of fn(); on a CUDA device the GPU is synchronised before and after."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out
