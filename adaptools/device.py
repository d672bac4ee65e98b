"""Device choice (`auto` is CUDA when available, else CPU) and torch's intra-op thread count."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import InvalidArgumentError


DEVICE_TYPES = ("cpu", "cuda")
"""Devices adaptools computes on (others, such as `meta` which holds no data, are refused)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for `auto`, `cpu`, `cuda` or `cuda:N`; InvalidArgumentError for anything else, or
    for a CUDA device this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = device if isinstance(device, torch.device) else torch.device(str(device))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"unknown device {str(device)!r} (choose auto, cpu, cuda or cuda:N)") from exc
    if chosen.type not in DEVICE_TYPES:
        raise InvalidArgumentError(f"device {str(device)!r} is not one adaptools computes on (choose auto, cpu, cuda "
                                   "or cuda:N)")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {str(device)!r} asked for, but no CUDA device is available")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise InvalidArgumentError(f"device {str(device)!r} asked for, but this machine has "
                                   f"{torch.cuda.device_count()} CUDA device(s)")
    return chosen


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` (None: unchanged) inside the block, restored after. Threads started
    inside the block run their torch ops on `count` threads too (torch sets up each new thread from this count)."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count is not None:
            torch.set_num_threads(before)
