"""Tensor files at the edge: read safetensors (or, only when allowed, pickle) into tensors, with typed errors."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..digests import reading
from ..errors import (
    AdapterFormatError,
    InputNotFoundError,
    NonFiniteError,
    PickleNotAllowedError,
    RankMismatchError,
    ShapeMismatchError,
)
from ..finite import all_finite
from ..jsonio import parse_json
from ..names import listed
from ..checkpoints.safetensors_io import MAX_HEADER_BYTES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def require_exists(path: str | os.PathLike) -> Path:
    """Return `path` as a Path, raising InputNotFoundError when nothing is there."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"{str(path)!r} does not exist")
    return path


def truncation(path: Path) -> str | None:
    """Why a file that starts like safetensors is cut short ("this file is truncated: ..."), or None when it is not."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES:
            return None
        header = f.read(length)
    if not header.lstrip().startswith(b"{"):
        return None
    if len(header) < length:
        return f"this file is truncated: its header needs {8 + length:,} bytes and the file has {size:,}"
    try:
        entries = parse_json(header, str(path), AdapterFormatError)
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except (AdapterFormatError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    if 8 + length + end > size:
        return f"this file is truncated: its tensors need {8 + length + end:,} bytes and the file has {size:,}"
    return None


def unreadable(path: Path, exc: Exception) -> AdapterFormatError:
    """The error for a safetensors file that does not open: truncated, or not safetensors at all."""
    reason = truncation(path)
    if reason:
        return AdapterFormatError(f"{str(path)!r}: {reason} (an interrupted download?)")
    return AdapterFormatError(f"{str(path)!r} is not a readable safetensors file ({exc})")


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a corrupt or truncated file raises AdapterFormatError."""
    path = require_exists(path)
    try:
        with reading(path), safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {key: f.get_tensor(key) for key in f.keys()}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise unreadable(path, exc) from exc


def safetensors_header(path: Path) -> tuple[list[str], dict[str, str]] | None:
    """(tensor names, metadata) of a safetensors file without reading its data; None when it does not open."""
    if not path.is_file() or path.suffix in PICKLE_SUFFIXES:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes adapter factors are read in: integers would wrap or round, float8 has no family that stores it."""


def check_stored(module: str, role: str, tensor: Tensor) -> None:
    """AdapterFormatError unless a stored factor is floating point (FACTOR_DTYPES) and not empty."""
    if tensor.dtype not in FACTOR_DTYPES:
        raise AdapterFormatError(
            f"module {module!r}: {role} is stored as {str(tensor.dtype).removeprefix('torch.')}; adapter factors must "
            "be float16, bfloat16, float32 or float64"
        )
    if tensor.numel() == 0:
        raise AdapterFormatError(f"module {module!r}: {role} of shape {tuple(tensor.shape)} is empty")


def check_factors(module: str, A: Tensor, B: Tensor, names: tuple[str, str] = ("lora_A", "lora_B")) -> None:
    """Raise unless A (r, in[, k...]) and B (out, r[, 1...]) are LoRA factors: floating point, same number of dims,
    one rank ≥ 1, no empty dimension, 1x1 kernel in B."""
    if A.ndim < 2 or B.ndim != A.ndim:
        raise ShapeMismatchError(
            f"module {module!r}: {names[0]} of shape {tuple(A.shape)} and {names[1]} of shape {tuple(B.shape)} are not LoRA factors"
        )
    if A.shape[0] != B.shape[1]:
        raise RankMismatchError(f"module {module!r}: {names[0]} has rank {A.shape[0]} but {names[1]} has rank {B.shape[1]}")
    if A.shape[0] == 0:
        raise RankMismatchError(f"module {module!r}: {names[0]} and {names[1]} have rank 0 (an empty update)")
    check_stored(module, names[0], A)
    check_stored(module, names[1], B)
    if any(s != 1 for s in B.shape[2:]):
        raise ShapeMismatchError(f"module {module!r}: {names[1]} must have a 1x1 kernel, got {tuple(B.shape)}")


def check_magnitude(module: str, magnitude: Tensor, name: str = "lora_magnitude_vector") -> None:
    """Raise AdapterFormatError unless every DoRA magnitude m (the norm of a row of W') is positive and finite."""
    check_stored(module, name, magnitude)
    bad = ~(torch.isfinite(magnitude) & (magnitude > 0))
    if bool(bad.any()):
        value = float(magnitude.reshape(-1)[bad.reshape(-1)][0])
        raise AdapterFormatError(f"module {module!r}: DoRA {name} must be positive and finite (it is a row norm), but "
                                 f"{int(bad.sum())} of {magnitude.numel()} values are not (e.g. {value})")


def read_pickle(path: str | os.PathLike, allow_pickle: bool) -> dict[str, Tensor]:
    """A pickled state dict, loaded with torch.load(weights_only=True) only when `allow_pickle` is set."""
    path = require_exists(path)
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{str(path)!r} is a pickle file; pass --allow-pickle (allow_pickle=True) to load it with weights_only=True"
        )
    with reading(path):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a broken or unsafe pickle
            raise AdapterFormatError(f"{str(path)!r} is not a readable torch state dict ({exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise AdapterFormatError(f"{str(path)!r} does not hold a flat dict of tensors")
    return state


def read_tensor_file(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors or (allowed) pickle file, chosen by suffix."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle), {}
    return read_safetensors(path)


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write contiguous CPU copies of `tensors` with `{"format": "pt"}` metadata (what transformers and PEFT expect);
    NonFiniteError, before anything is written, when a floating tensor holds NaN or Inf (its numbers overflowed)."""
    prepared = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    bad = [repr(k) for k, v in prepared.items() if v.is_floating_point() and not all_finite(v)]
    if bad:
        raise NonFiniteError(f"cannot write {Path(path).name!r}: NaN or Inf (numbers that overflow their dtype) in "
                             f"{listed(bad)}")
    save_file(prepared, str(path), metadata={"format": "pt", **(metadata or {})})
