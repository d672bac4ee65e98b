"""Device choice: `auto` is CUDA when available, else CPU."""
from __future__ import annotations

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
