"""Device choice (`auto` is CUDA when available, else CPU) and torch's intra-op thread count."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import InvalidArgumentError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return the torch device for `auto`, `cpu`, `cuda` or `cuda:N`."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError(f"device {device!r} asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise InvalidArgumentError(f"unknown device {device!r}") from exc


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
